"""Join a folder's intermediates into `{folder}.jsonl` (sorted by id) and `{folder}.errors.jsonl`.

Each run rewrites the folder from the ids discovered now: no duplicates, no stale lines for
deleted files. Both files are written atomically under a folder lock, so concurrent runs
never interleave and a reader never sees a torn file.
"""

from __future__ import annotations

from tasks.records import FileError, FolderReport, OutputLine, Tokens, Transcription, folder_of
from tasks.storage import Store


def jsonl_name(folder: str) -> str:
    return f"{folder}.jsonl"


def errors_name(folder: str) -> str:
    return f"{folder}.errors.jsonl"


def merge_folder(folder: str, ids: list[str], store: Store, known_errors: list[FileError] = ()) -> FolderReport:
    """Write the folder's JSONL from the intermediates of `ids`; returns what was written.

    `known_errors` are failures found before any stage ran (e.g. at discovery).
    """
    lines: list[OutputLine] = []
    errors: list[FileError] = list(known_errors)
    audio_seconds = 0.0
    for file_id in sorted(ids):
        transcription = store.read_transcription(file_id)
        tokens = store.read_tokens(file_id)
        if isinstance(transcription, Transcription) and isinstance(tokens, Tokens):
            lines.append(OutputLine(id=file_id, transcription=transcription.text, token_array=tokens.token_array))
            audio_seconds += transcription.duration
            continue
        errors.extend(_why_missing(file_id, transcription, tokens))
    errors = _dedupe(errors)
    with store.folder_lock(folder):
        changed = store.write_lines_if_changed(jsonl_name(folder), lines)
        if errors:
            changed |= store.write_lines_if_changed(errors_name(folder), errors)
        else:
            store.remove(errors_name(folder))
    return FolderReport(
        folder=folder, files=len(ids) + len({e.id for e in known_errors}), lines=len(lines),
        errors=errors, audio_seconds=audio_seconds, changed=changed,
        jsonl=store.display(jsonl_name(folder)),
        errors_jsonl=store.display(errors_name(folder)) if errors else None,
    )


def _why_missing(file_id: str, transcription, tokens) -> list[FileError]:
    errors = []
    for record, stage in ((transcription, "transcribe"), (tokens, "tokenise")):
        if record is None:
            errors.append(FileError(id=file_id, stage=stage, error=f"no {stage} result was produced (task failed or was interrupted)"))
        elif not isinstance(record, (Transcription, Tokens)):
            errors.append(FileError(id=file_id, stage=record.stage, error=record.error))
    return errors


def _dedupe(errors: list[FileError]) -> list[FileError]:
    """One line per (id, stage, error), sorted by id: a corrupt file fails both stages alike."""
    seen = {(e.id, e.stage, e.error): e for e in errors}
    return [seen[k] for k in sorted(seen)]


# -- Prefect task ------------------------------------------------------------------------------
import re  # noqa: E402

from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from tasks.records import OutputOptions  # noqa: E402
from tasks.settings import PipelineSettings  # noqa: E402


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:100] or "root"


@task(name="merge-folders", task_run_name="merge-{label}", cache_policy=NO_CACHE)
def merge_folders(
    plan: str, group: int, label: str, settings: PipelineSettings, failed: dict[str, str] | None = None
) -> list[FolderReport]:
    """Merge the folders of group `group` of the run plan at `plan` into their JSONL files.

    `failed` maps the group's failed stage tasks ("transcribe-3") to their error, which becomes
    the reason for the missing stage of their files.
    """
    return merge_group(plan, group, settings, failed or {})


def merge_group(plan: str, group: int, settings: PipelineSettings, failed: dict[str, str]) -> list[FolderReport]:
    """`merge_folders` without Prefect (the flow calls it in-process when the cluster is gone)."""
    from tasks import stage_compat
    from tasks.plan import group_files, load_group, load_plan
    from tasks.records import folder_of as folder_of_id  # not the top import: that part is another helper's

    run, members = load_plan(plan), load_group(plan, group)
    files, shards_of = group_files(run, members)
    store = Store(settings.results_root)
    output = OutputOptions(with_quality=settings.with_quality, drop_flagged=settings.drop_flagged)
    reports = []
    for folder in members.folders:
        stage_errors: dict[str, str] = {}
        for stage in ("transcribe", "tokenise"):
            reasons = [failed[key] for i in shards_of.get(folder, []) if (key := f"{stage}-{i}") in failed]
            if reasons:
                stage_errors[stage] = reasons[0]
        known = [e for e in members.errors if folder_of_id(e.id) == folder]
        reports.append(stage_compat.merge_folder(
            folder, files[folder], store, run.provenance, known, stage_errors, output))
    return reports


def publish_folder_artifact(report: FolderReport, results_root: str) -> None:
    """A markdown artifact pointing at the folder's outputs (called from the flow run users open)."""
    create_markdown_artifact(
        key=artifact_key("folder", report.folder), markdown=folder_markdown(report, Store(results_root)),
        description=f"Outputs of folder {report.folder}",
    )


def folder_markdown(report: FolderReport, store: Store) -> str:
    lines = [
        f"# `{report.folder}`", "",
        f"- lines: **{report.lines}** of {report.files} files"
        + (f", **{len(report.errors)} errors**" if report.errors else ""),
        f"- JSONL: `{report.jsonl}`",
    ]
    if report.errors_jsonl:
        lines.append(f"- errors: `{report.errors_jsonl}`")
    lines += [
        f"- transcriptions: `{store.display('transcriptions/' + report.folder)}/`",
        f"- tokens: `{store.display('tokens/' + report.folder)}/`",
    ]
    if report.errors:
        lines += ["", "| id | stage | error |", "|---|---|---|"]
        lines += [f"| {e.id} | {e.stage} | {e.error[:200]} |" for e in report.errors[:50]]
    return "\n".join(lines) + "\n"

"""Join a folder's intermediates into `{folder}.jsonl` (sorted by id) and `{folder}.errors.jsonl`.

Each run rewrites the folder from the files discovered now: no duplicates, no stale lines for
deleted files. Merge trusts nothing it did not check: a record joins a line only if its provenance
matches this run's (`tasks.provenance`); otherwise the file misses that stage and is reported
failed, with the failed task's reason when there is one. `{folder}.errors.jsonl` holds one line
per failed file. The JSONL, the errors file and the folder index (`tasks.folder_index`) are
written atomically under the folder lock, so concurrent runs never interleave and a reader never
sees a torn file.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tasks.folder_index import IndexEntry, load_index, save_index
from tasks.provenance import (
    own_failure,
    tokens_problem,
    tokens_reusable,
    transcription_problem,
    transcription_reusable,
)
from tasks.records import (
    AudioFile,
    FileError,
    FolderReport,
    OutputLine,
    OutputOptions,
    Provenance,
    QualityOutputLine,
    Tokens,
    Transcription,
)
from tasks.storage import Kind, Store, output_name_problem, parse_intermediate

WORST_CLIPS = 5  # flagged clips listed per folder in the report and the folder artifact
_SIDES: tuple[tuple[Kind, str], ...] = (("transcriptions", "transcribe"), ("tokens", "tokenise"))


def jsonl_name(folder: str) -> str:
    return f"{folder}.jsonl"


def errors_name(folder: str) -> str:
    return f"{folder}.errors.jsonl"


def merge_folder(
    folder: str,
    files: list[AudioFile],
    store: Store,
    expect: Provenance,
    known_errors: list[FileError] = (),
    stage_errors: dict[str, str] | None = None,
    output: OutputOptions = OutputOptions(),  # noqa: B008 (frozen record: a safe default)
) -> FolderReport:
    """Write the folder's outputs from the intermediates of `files` that match `expect`.

    Args:
        files: this run's discovery of the folder (ids with their source size/mtime).
        known_errors: failures found before any stage ran (e.g. at discovery).
        stage_errors: "transcribe"/"tokenise" -> why a task covering this folder failed; the
            reason given for files missing that stage.
        output: `with_quality` adds a `quality` object to each line; `drop_flagged` moves clips
            with quality flags to the errors file (stage "quality").
    """
    files = sorted({f.id: f for f in files}.values(), key=lambda f: f.id)
    n_files = len(files) + len({e.id for e in known_errors} - {f.id for f in files})
    with store.folder_lock(folder):
        refused = output_name_problem(folder)
        if refused is not None:
            errors = _one_per_file([*known_errors, *(FileError(id=f.id, stage="merge", error=refused) for f in files)])
            changed = _write_errors(store, folder, errors)
            return FolderReport(
                folder=folder, files=n_files, lines=0, errors=errors, changed=changed,
                jsonl=store.display(jsonl_name(folder)), errors_jsonl=store.display(errors_name(folder)),
            )
        joined = _Joined(folder, files, store, expect, stage_errors or {}, output)
        errors = _one_per_file([*known_errors, *joined.errors])
        changed = store.write_lines_if_changed(jsonl_name(folder), joined.lines)
        changed |= _write_errors(store, folder, errors)
        save_index(store, joined.index, joined.entries)
    return FolderReport(
        folder=folder, files=n_files, lines=len(joined.lines), errors=errors,
        audio_seconds=joined.audio_seconds, changed=changed, jsonl=store.display(jsonl_name(folder)),
        errors_jsonl=store.display(errors_name(folder)) if errors else None,
        new=joined.new, flagged=len(joined.flagged), worst=_worst(joined.flagged),
    )


class _Joined:
    """One folder's records joined into lines and errors, plus its next index entries.

    Records come from the index when it vouches for them (same checks as reuse), otherwise from
    the intermediates, all read in one bulk call.
    """

    def __init__(
        self, folder: str, files: list[AudioFile], store: Store, expect: Provenance,
        stage_errors: dict[str, str], output: OutputOptions,
    ) -> None:
        self.index = load_index(store, folder)
        from_index: dict[Kind, dict[str, Any]] = {"transcriptions": {}, "tokens": {}}
        for f in files:
            t, k = self.index.record("transcriptions", f.id), self.index.record("tokens", f.id)
            if transcription_reusable(t, f, expect):
                from_index["transcriptions"][f.id] = t
            if tokens_reusable(k, f, expect):
                from_index["tokens"][f.id] = k
        fetched = _read_missing(store, files, from_index)
        self.lines: list[OutputLine] = []
        self.errors: list[FileError] = []
        self.entries: dict[str, IndexEntry] = {}
        self.flagged: list[tuple[Transcription, list[str]]] = []
        self.audio_seconds = 0.0
        self.new = 0
        for f in files:
            t = from_index["transcriptions"].get(f.id) or fetched["transcriptions"].get(f.id)
            k = from_index["tokens"].get(f.id) or fetched["tokens"].get(f.id)
            # The index keeps the latest success known for each stage, matching this run or not,
            # so switching settings back and forth stays cheap.
            self.entries[f.id] = IndexEntry(
                transcription=t if isinstance(t, Transcription) else None,
                tokens=k if isinstance(k, Tokens) else None,
            )
            problems = {"transcriptions": transcription_problem(t, f, expect), "tokens": tokens_problem(k, f, expect)}
            if problems["transcriptions"] is None and problems["tokens"] is None:
                self.new += f.id in fetched["transcriptions"] or f.id in fetched["tokens"]
                self._add_line(t, k, output)
                continue
            failed = [
                (stage, _stage_failure(kind, stage, record, f, problems[kind], stage_errors))
                for (kind, stage), record in zip(_SIDES, (t, k), strict=True) if problems[kind] is not None
            ]
            self.errors.append(_combine(f.id, failed))

    def _add_line(self, t: Transcription, k: Tokens, output: OutputOptions) -> None:
        flags = list(t.quality.flags) if t.quality is not None else []
        if flags:
            self.flagged.append((t, flags))
            if output.drop_flagged:
                self.errors.append(FileError(
                    id=t.id, stage="quality", error=f"quality flags: {', '.join(flags)}; text: {t.text[:120]!r}",
                ))
                return
        if output.with_quality:
            line: OutputLine = QualityOutputLine(
                id=t.id, transcription=t.text, token_array=k.token_array, quality=quality_object(t, k)
            )
        else:
            line = OutputLine(id=t.id, transcription=t.text, token_array=k.token_array)
        self.lines.append(line)
        self.audio_seconds += t.duration


def quality_object(t: Transcription, k: Tokens) -> dict[str, Any]:
    """The `quality` of a `--with-quality` line: duration and language, the service's transcript
    quality and the audio's, in one flat object (docs list each field's meaning and unit)."""
    quality: dict[str, Any] = {"duration": t.duration, "language": t.language}
    if t.quality is not None:
        quality.update(t.quality.model_dump())
    if k.audio is not None:
        quality.update(k.audio.model_dump())
    return quality


def _read_missing(store: Store, files: list[AudioFile], from_index: dict[Kind, dict[str, Any]]) -> dict[Kind, dict]:
    """The intermediates the index does not vouch for, both stages in one bulk read."""
    wanted = [(kind, f.id) for f in files for kind, _ in _SIDES if f.id not in from_index[kind]]
    blobs = store.read_many([store.intermediate(kind, i) for kind, i in wanted])
    fetched: dict[Kind, dict] = {"transcriptions": {}, "tokens": {}}
    for (kind, file_id), data in zip(wanted, blobs, strict=True):
        fetched[kind][file_id] = parse_intermediate(data, file_id, Transcription if kind == "transcriptions" else Tokens)
    return fetched


def _stage_failure(
    kind: Kind, stage: str, record: object, file: AudioFile, problem: str, stage_errors: dict[str, str]
) -> FileError:
    """Why `file` has no usable record for one stage: its own recorded failure, else the failed
    task's reason, else what is wrong with what is stored."""
    failure = own_failure(record, file)
    if failure is not None:
        return FileError(id=file.id, stage=failure.stage, error=failure.error)
    task_error = stage_errors.get(stage)
    if task_error:
        detail = "" if problem == "none stored" else f" ({problem})"
        return FileError(id=file.id, stage=stage, error=f"the {stage} task failed: {task_error}{detail}")
    if problem == "none stored":
        problem = "the task did not finish (interrupted, or its worker was lost)"
    return FileError(id=file.id, stage=stage, error=f"no {stage} result for this run: {problem}")


def _combine(file_id: str, failed: list[tuple[str, FileError]]) -> FileError:
    """One error per file: the first failing stage, and each failed stage's error in the text,
    labelled (the same text once)."""
    first = failed[0][1]
    if len({e.error for _, e in failed}) == 1:
        return first
    return FileError(id=file_id, stage=first.stage, error="; ".join(f"{label}: {e.error}" for label, e in failed))


def _one_per_file(errors: list[FileError]) -> list[FileError]:
    """Sorted by id, one line per id: a file's several errors are combined into one."""
    by_id: dict[str, list[FileError]] = defaultdict(list)
    for e in errors:
        if e not in by_id[e.id]:
            by_id[e.id].append(e)
    return [_combine(i, [(e.stage, e) for e in by_id[i]]) for i in sorted(by_id)]


def _write_errors(store: Store, folder: str, errors: list[FileError]) -> bool:
    if errors:
        return store.write_lines_if_changed(errors_name(folder), errors)
    store.remove(errors_name(folder))
    return False


def _worst(flagged: list[tuple[Transcription, list[str]]]) -> list[dict[str, Any]]:
    """The few flagged clips most worth a look: most flags, then highest compression ratio."""

    def badness(item: tuple[Transcription, list[str]]) -> tuple:
        t, flags = item
        q = t.quality
        return (-len(flags), -((q and q.compression_ratio) or 0.0), (q and q.avg_logprob) or 0.0, t.id)

    return [{"id": t.id, "flags": flags, "text": t.text[:200]} for t, flags in sorted(flagged, key=badness)[:WORST_CLIPS]]


# -- Prefect task ------------------------------------------------------------------------------
import re  # noqa: E402

from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from tasks.records import folder_of  # noqa: E402


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:100] or "root"


@task(name="merge-folders", task_run_name="merge-{label}", cache_policy=NO_CACHE)
def merge_folders(
    folders: dict[str, list[AudioFile]], results_root: str, known_errors: list[FileError], label: str,
    expect: Provenance, stage_errors: dict[str, dict[str, str]] | None = None,
    output: OutputOptions = OutputOptions(),  # noqa: B008
) -> list[FolderReport]:
    """Merge each folder's intermediates into its JSONL files."""
    store = Store(results_root)
    return [
        merge_folder(
            folder, files, store, expect, [e for e in known_errors if folder_of(e.id) == folder],
            (stage_errors or {}).get(folder), output,
        )
        for folder, files in sorted(folders.items())
    ]


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
    if report.flagged:
        lines.append(f"- flagged clips: **{report.flagged}**")
    if report.worst:
        lines += ["", "| flagged clip | flags | text |", "|---|---|---|"]
        lines += [f"| {w['id']} | {', '.join(w['flags'])} | {w['text'][:120]} |" for w in report.worst]
    if report.errors:
        lines += ["", "| id | stage | error |", "|---|---|---|"]
        lines += [f"| {e.id} | {e.stage} | {e.error[:200]} |" for e in report.errors[:50]]
    return "\n".join(lines) + "\n"

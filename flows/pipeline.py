"""The Prefect flow: discover -> (transcribe || tokenise) per shard on Dask -> merge per folder.

The outer flow holds the parameters users see in the UI and fails fast when the service is
down; the inner flow runs on the Dask task runner chosen for this machine (`flows.runner`),
which can only be picked once the parameters are known, hence the subflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from uuid import UUID

import dask
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture

from flows.runner import GPU_RESOURCE, make_task_runner, uses_gpu_resources, worker_count
from flows.watchdog import NoWorkersWatchdog, finished
from tasks.discover import group_folders, list_audio, make_batches, make_shards
from tasks.merge import merge_folders, publish_folder_artifact
from tasks.records import (
    AudioFile,
    FileError,
    FolderReport,
    OutputOptions,
    Provenance,
    RunSummary,
    Shard,
    StageReport,
    folder_of,
)
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokenise_shard, tokeniser_for
from tasks.transcribe import check_service, transcribe_shard


@flow(name="parallel-transcribe-tokenise", log_prints=True)
def parallel_transcribe_tokenise(
    audio_root: str,
    results_root: str | None = None,
    service_url: str | None = None,
    tokenizer: str | None = None,
    batch_size: int | None = None,
    extensions: list[str] | None = None,
    dask_address: str | None = None,
    n_workers: int | None = None,
) -> RunSummary:
    """Transcribe and tokenise every audio file under `audio_root` into `{results_root}/{folder}.jsonl`.

    A parameter left empty falls back to the worker's `AUDIO_PIPELINE_*` environment, then to
    the default named here; a parameter's default must not mask the environment.

    Args:
        audio_root: Local path or fsspec URL of the speaker folders.
        results_root: Local path or fsspec URL for outputs (default `results`).
        service_url: Whisper service base URL (default `http://localhost:8000`).
        tokenizer: rpq (default), simulated or encodec.
        batch_size: Files per batch, one engine call each (default 32).
        extensions: Audio suffixes to pick up (default .flac .wav .mp3 .ogg).
        dask_address: An existing Dask scheduler; empty starts a local cluster.
        n_workers: Local Dask workers when there is no GPU (default: one per 2 cores, up to 4).
    """
    return run_pipeline(settings_from_parameters(
        audio_root=audio_root, results_root=results_root, service_url=service_url, tokenizer=tokenizer,
        batch_size=batch_size, extensions=extensions, dask_address=dask_address, n_workers=n_workers,
    ))


def settings_from_parameters(**parameters: object) -> PipelineSettings:
    """Flow parameters over `AUDIO_PIPELINE_*` env over defaults: None means "not given"."""
    return PipelineSettings(**{k: v for k, v in parameters.items() if v is not None})


def run_pipeline(settings: PipelineSettings) -> RunSummary:
    """Everything the flow does, for callers that already hold settings (CLI, tests)."""
    logger = get_run_logger()
    started = time.monotonic()
    health = check_service(settings)  # before any work is scheduled
    for leftover in Store(settings.results_root).sweep_stale_temps():
        logger.info("removed %s, a temp file an earlier run was killed while writing", leftover)
    files, discover_errors = list_audio(settings.audio_root, settings.extensions)
    logger.info("found %d audio files under %s (%d refused)", len(files), settings.audio_root, len(discover_errors))
    ids_by_folder: dict[str, list[AudioFile]] = defaultdict(list)
    for f in files:
        ids_by_folder[f.folder].append(f)
    for e in discover_errors:
        ids_by_folder.setdefault(folder_of(e.id), [])
    shards = make_shards(make_batches(files, settings.batch_size), worker_count(settings), settings.shard_max_files)
    groups = group_folders(sorted(ids_by_folder), settings.merge_max_tasks)
    share_api_url_with_workers()
    # Artifacts live on this run (the one users open from the deployment), not on the subflow.
    progress = create_progress_artifact(progress=0.0, key="progress", description="Shard-stages done")
    inner = process_shards.with_options(task_runner=make_task_runner(settings))
    expect = Provenance(
        decode_fingerprint=health.get("fingerprint"), language=settings.language,
        tokenizer_settings=json.loads(json.dumps(tokeniser_for(settings).settings)),
    )
    reports = inner(shards, groups, dict(ids_by_folder), discover_errors, settings, expect, progress)
    for report in reports:
        if report.changed:  # a triggered run for 2 new files publishes 1 folder, not all 110
            publish_folder_artifact(report, settings.results_root)
    # Kept, not deleted: an unreadable mount or a narrower --extensions also makes folders vanish.
    stale = sorted(Store(settings.results_root).folders_with_results() - set(ids_by_folder))
    if stale:
        logger.warning(
            "%d folder(s) have results but no audio under %s any more (kept; delete them if those "
            "speakers were removed on purpose): %s", len(stale), settings.audio_root,
            ", ".join(f"{f}.jsonl" for f in stale[:10]),
        )
    summary = summarise(reports, settings, time.monotonic() - started, stale)
    create_table_artifact(
        key="run-summary", table=[summary_row(summary)],
        description=f"audio-pipeline run over {settings.audio_root}",
    )
    logger.info(
        "%d files -> %d lines, %d failed, %.3f audio hours, %.1f files/s; results in %s",
        summary.files, summary.lines, summary.failed, summary.audio_hours,
        summary.files_per_second, summary.results_root,
    )
    return summary


@flow(name="transcribe-tokenise-merge")
def process_shards(
    shards: list[Shard],
    groups: list[list[str]],
    ids_by_folder: dict[str, list[AudioFile]],
    discover_errors: list[FileError],
    settings: PipelineSettings,
    expect: Provenance,
    progress: UUID,
) -> list[FolderReport]:
    """Map both stages over the shards; merge each folder group as soon as its shards are done."""
    logger = get_run_logger()
    stage_futures: list[tuple[PrefectFuture, Shard]] = []
    stage_of: dict[int, str] = {}
    for shard in shards:
        stage_futures.append((transcribe_shard.submit(shard, settings, expect), shard))
        stage_of[id(stage_futures[-1][0])] = "transcribe"
        if uses_gpu_resources(settings):
            with dask.annotate(resources={GPU_RESOURCE: 1}):
                stage_futures.append((tokenise_shard.submit(shard, settings, expect), shard))
        else:
            stage_futures.append((tokenise_shard.submit(shard, settings, expect), shard))
        stage_of[id(stage_futures[-1][0])] = "tokenise"
    stage_errors: dict[str, dict[str, str]] = defaultdict(dict)
    output = OutputOptions(with_quality=settings.with_quality, drop_flagged=settings.drop_flagged)

    group_of = {folder: i for i, group in enumerate(groups) for folder in group}
    pending = [0] * len(groups)
    for _, shard in stage_futures:
        for i in {group_of[folder] for folder in shard.folders}:
            pending[i] += 1
    merges: dict[int, PrefectFuture] = {}
    reports: dict[int, list[FolderReport]] = {}

    def folders_of(i: int) -> dict[str, list[AudioFile]]:
        return {folder: ids_by_folder[folder] for folder in groups[i]}

    def label_of(i: int) -> str:
        return groups[i][0] if len(groups[i]) == 1 else f"{groups[i][0]}-to-{groups[i][-1]}"

    def submit_merge(i: int) -> None:
        merges[i] = merge_folders.submit(
            folders_of(i), settings.results_root, discover_errors, label_of(i), expect,
            {f: dict(stage_errors[f]) for f in groups[i] if f in stage_errors}, output,
        )

    def shard_stage_over(shard: Shard) -> None:
        for i in {group_of[folder] for folder in shard.folders}:
            pending[i] -= 1
            if pending[i] == 0 and not watchdog.gave_up.is_set():
                submit_merge(i)

    for i, count in enumerate(pending):
        if count == 0:  # folders whose every file was refused at discovery
            submit_merge(i)
    shard_of = {id(f): s for f, s in stage_futures}
    done = 0
    watchdog = NoWorkersWatchdog(FlowRunContext.get().task_runner.client, settings.no_workers_timeout_s)
    with watchdog, terminal_progress(settings.show_progress, total=2 * sum(s.n_files for s in shards)) as advance:
        unfinished = {id(f): f for f, _ in stage_futures}
        for future in finished([f for f, _ in stage_futures], watchdog.gave_up):
            del unfinished[id(future)]
            done += 1
            shard = shard_of[id(future)]
            if _report_or_none(future) is None:
                logger.error("a stage task of shard %d failed; its files will be reported as failed", shard.index)
                for folder in shard.folders:
                    stage_errors[folder][stage_of[id(future)]] = _failure_text(future)
            update_progress_artifact(progress, progress=100.0 * done / len(stage_futures))
            advance(shard.n_files)
            shard_stage_over(shard)
        merge_futures = {id(f): i for i, f in merges.items()}
        for future in finished(list(merges.values()), watchdog.gave_up):
            reports[merge_futures[id(future)]] = future.result()
    if watchdog.gave_up.is_set():
        logger.error(
            "the Dask cluster has had no workers for %.0f s: giving up on %d unfinished shard-stages "
            "and merging %d folder groups in this process (unfinished files are reported as failed; "
            "finished work is kept, so a rerun does only what is missing). Start workers, then run again.",
            settings.no_workers_timeout_s, len(unfinished), len(groups) - len(reports),
        )
        watchdog.cancel([*unfinished.values(), *merges.values()])
        for future in unfinished.values():
            shard_stage_over(shard_of[id(future)])
        for i in range(len(groups)):  # in this process: there is no worker to run them
            if i not in reports:
                reports[i] = merge_folders(
                    folders_of(i), settings.results_root, discover_errors, label_of(i), expect,
                    {f: dict(stage_errors[f]) for f in groups[i] if f in stage_errors}, output,
                )
    if not stage_futures:
        update_progress_artifact(progress, progress=100.0)
    return [report for i in sorted(reports) for report in reports[i]]


def share_api_url_with_workers() -> None:
    """Point local Dask worker processes at this run's Prefect API.

    Workers inherit os.environ, not Prefect's in-process settings. Without a configured
    PREFECT_API_URL (ephemeral mode, the test harness) every worker thread would start an
    ephemeral API server of its own (minutes each) and record its task runs in a database
    nobody looks at. Remote workers (`dask_address`) need PREFECT_API_URL set on their side.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        os.environ["PREFECT_API_URL"] = str(client.api_url)


@contextlib.contextmanager
def terminal_progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over file-stages (each file is transcribed and tokenised), or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("file-stages"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task_id = bar.add_task("stages", total=total)
        yield lambda n: bar.advance(task_id, n)


def _report_or_none(future: PrefectFuture) -> StageReport | None:
    future.wait()
    if future.state.is_completed():
        return future.result()
    return None


def _failure_text(future: PrefectFuture) -> str:
    """The exception a failed task raised, as one line (what merge reports for its files)."""
    try:
        future.result(raise_on_failure=True)
    except BaseException as e:  # noqa: BLE001 (any task failure is reported, never raised here)
        return f"{type(e).__name__}: {e}".splitlines()[0][:500]
    return future.state.message or "the task did not complete"


def summarise(
    reports: list[FolderReport], settings: PipelineSettings, wall_seconds: float, stale_folders: list[str] = ()
) -> RunSummary:
    files = sum(r.files for r in reports)
    errors = [e for r in reports for e in r.errors]
    return RunSummary(
        folders=len(reports), files=files, lines=sum(r.lines for r in reports),
        failed=len({e.id for e in errors}), audio_hours=sum(r.audio_seconds for r in reports) / 3600,
        wall_seconds=wall_seconds, files_per_second=files / wall_seconds if wall_seconds > 0 else 0.0,
        results_root=settings.results_root, errors=errors, stale_folders=list(stale_folders),
    )


def summary_row(summary: RunSummary) -> dict[str, object]:
    return {
        "folders": summary.folders, "files": summary.files, "lines": summary.lines,
        "failed": summary.failed, "audio_hours": round(summary.audio_hours, 4),
        "files_per_s": round(summary.files_per_second, 2), "wall_s": round(summary.wall_seconds, 1),
        "results": summary.results_root,
    }

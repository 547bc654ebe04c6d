"""The Prefect flow: check -> plan (on storage) -> transcribe || tokenise per shard -> merge per group.

Every parameter a task gets is a reference (the plan's location and an index) plus the settings,
so Prefect and Dask carry a few KB per task whatever the corpus size (DESIGN.md section 3.0).
The flow's own task runner is started once the settings are validated (`PipelineTaskRunner`),
so the task runs show on the run users open. Folders unchanged since their last merge get no
task at all (`tasks.settled`): a rerun costs O(folders) reads plus the work on what changed.

Outcomes (README "Exit codes"): a run that cannot start raises `RunNotStartedError` before any
work; a run whose failed files exceed `max_failed_fraction` ends Failed, with the summary as data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect import allow_failure, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Failed, State

from flows.artifacts import Progress, publish_run_artifacts, report_progress, start_progress
from flows.runner import GPU_RESOURCE, PipelineTaskRunner, uses_gpu_resources, worker_count
from flows.watchdog import NoWorkersWatchdog, finished
from tasks.export.task import run_exports
from tasks.manifest import write_manifest
from tasks.merge import REMOVED_SHOWN, merge_folders, merge_group, write_refused
from tasks.plan import RunPlan, build_plan, new_run_id, prune_runs
from tasks.preflight import RunNotStartedError, in_parameter_terms, preflight, settings_or_error
from tasks.records import FileError, FolderReport, RunSummary, source_id
from tasks.segments import segment_task
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokenise_shard
from tasks.transcribe import transcribe_shard

STAGES = ("transcribe", "tokenise")
REASON_CHARS = 1000  # a failed task's error as passed to its merge: bounded, like every parameter


@flow(name="parallel-transcribe-tokenise", log_prints=True, task_runner=PipelineTaskRunner())
def parallel_transcribe_tokenise(
    audio_root: str,
    results_root: str | None = None,
    results_base: str | None = None,
    service_url: str | None = None,
    tokenizer: str | None = None,
    batch_size: int | None = None,
    extensions: list[str] | None = None,
    dask_address: str | None = None,
    n_workers: int | None = None,
    with_quality: bool | None = None,
    drop_flagged: bool | None = None,
    max_failed_fraction: float | None = None,
    export_formats: list[str] | None = None,
    export_root: str | None = None,
    verify_content: bool | None = None,
    segmentation: dict[str, Any] | None = None,
) -> RunSummary | State:
    """Transcribe and tokenise every audio file under `audio_root` into `{results_root}/{folder}.jsonl`.

    A parameter left empty falls back to the worker's `AUDIO_PIPELINE_*` environment, then to
    the default named here; a parameter's default must not mask the environment.

    Args:
        audio_root: Local path or fsspec URL of the speaker folders.
        results_root: Local path or fsspec URL for outputs (default: by the `results_base` rule, else `results`).
        results_base: When `results_root` is empty: results go to `{results_base}/{name}-{hash}`, one
            folder per audio root (`tasks.settings.results_root_for`), so one deployment serves many roots.
        service_url: Whisper service base URL (default `http://localhost:8000`).
        tokenizer: rpq (default), simulated or encodec.
        batch_size: Files per batch, one engine call each (default 32).
        extensions: Audio suffixes to pick up (default .flac .wav .mp3 .ogg).
        dask_address: An existing Dask scheduler; empty starts a local cluster.
        n_workers: Local Dask workers when there is no GPU (default: one per 2 cores, up to 4).
        with_quality: Add a `quality` object to each JSONL line (default false).
        drop_flagged: Move clips with quality flags to `{folder}.errors.jsonl` (default false).
        max_failed_fraction: Failed files (0..1 of all) the run may have and still end Completed (default 0).
        export_formats: Export the results at the end of the run: any of lhotse, hf, webdataset, nemo.
        export_root: Local directory for those exports, one folder per format (default `{results_root}-exports`).
        verify_content: Add each audio file's sha256 to its identity, for files rewritten in place with
            their times preserved (reads every file at every run; default false).
        segmentation: Long recordings (`SegmentOptions`): e.g. {"segment_over_s": 60} or {"no_segment": true}.
    """
    try:
        settings = settings_from_parameters(
            audio_root=audio_root, results_root=results_root, results_base=results_base, service_url=service_url,
            tokenizer=tokenizer, batch_size=batch_size, extensions=extensions, dask_address=dask_address,
            n_workers=n_workers, with_quality=with_quality, drop_flagged=drop_flagged,
            max_failed_fraction=max_failed_fraction, export_formats=export_formats, export_root=export_root,
            verify_content=verify_content, segmentation=segmentation,
        )
        if results_root is None and settings.results_base:
            get_run_logger().info("results root %s (results_base %s, one folder per audio root)",
                                  settings.results_root, settings.results_base)
        summary = run_pipeline(settings)
    except RunNotStartedError as e:
        return not_started(e)
    if too_many_failed(summary, settings.max_failed_fraction) or summary.export_errors:
        # Returned, not raised: the run ends Failed with this message and no traceback in its log;
        # a direct call raises it, and `summary_of(state)` gives the summary back.
        message = failed_message(summary, settings.max_failed_fraction)
        return Failed(message=message, data=FilesFailedError(message, summary))
    return summary


REFUSED_TAG = "refused"  # deployments.recheck reads it: the watcher does not announce such a run's files again


def not_started(error: RunNotStartedError) -> State:
    """A run that could not start ends Failed with the one-line reason: one ERROR log line, no traceback.

    Tagged `refused` when the same run would be refused again (allow-list, owner, bad settings,
    missing root): the watcher does not announce such a root's files again; a transient cause
    (the service not reachable) is not tagged. The state keeps the name Failed, so automations
    on Failed runs fire. The hint names the flow's parameters (`results_root`), as a
    deployment's caller knows them; a direct call (the CLI) still raises the original error.
    """
    message = in_parameter_terms(str(error))
    get_run_logger().error("the run could not start: %s", message)
    context = FlowRunContext.get()
    if not error.transient and context and context.flow_run and context.client:
        try:
            context.client.update_flow_run(context.flow_run.id, tags=[*context.flow_run.tags, REFUSED_TAG])
        except Exception as e:  # noqa: BLE001 (a missing tag costs a watcher's bounded retries, not the run)
            get_run_logger().debug("could not tag the run %s: %s", REFUSED_TAG, e)
    return Failed(message=message, data=error)


class FilesFailedError(RuntimeError):
    """More files failed than `max_failed_fraction` allows; everything else was written."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self):  # picklable with its summary (Prefect may persist the state's data)
        return type(self), (str(self), self.summary)


class OneLineFailures(logging.Filter):
    """Drops the engine's traceback for a run that ended Failed by design (could not start, too many
    files failed). Prefect 3.9's engine process re-raises a returned Failed state's exception and
    logs it as "Engine execution exited with unexpected exception" with the whole chain (~80
    lines); the reason is already the state's message and one ERROR line of the flow's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (RunNotStartedError, FilesFailedError))


if not any(isinstance(f, OneLineFailures) for f in logging.getLogger("prefect.flow_runs").filters):
    logging.getLogger("prefect.flow_runs").addFilter(OneLineFailures())


def settings_from_parameters(**parameters: object) -> PipelineSettings:
    """Flow parameters over `AUDIO_PIPELINE_*` env over defaults: None means "not given".

    Raises:
        RunNotStartedError: a value is invalid (one line naming it).
    """
    return settings_or_error(**parameters)


def too_many_failed(summary: RunSummary, max_failed_fraction: float) -> bool:
    return summary.failed > 0 and summary.failed > max_failed_fraction * max(summary.files, 1)


def failed_message(summary: RunSummary, max_failed_fraction: float) -> str:
    parts = []
    if too_many_failed(summary, max_failed_fraction):
        allowed = f" (more than the {max_failed_fraction:.2%} allowed)" if max_failed_fraction else ""
        parts.append(f"{summary.failed} of {summary.files} files failed{allowed}; "
                     f"see {summary.results_root}/*.errors.jsonl")
    parts += summary.export_errors
    return "; ".join(parts)


def summary_of(state: State) -> RunSummary:
    """The RunSummary of a finished run, Completed or Failed with files failing.

    Raises:
        the run's exception when it failed for another reason (could not start, crashed).
    """
    result = state.result(raise_on_failure=False)
    if isinstance(result, RunSummary):
        return result
    if isinstance(result, FilesFailedError):
        return result.summary
    if isinstance(result, BaseException):
        raise result
    raise RuntimeError(f"the run ended {state.type.value} without a summary: {state.message}")


def run_pipeline(settings: PipelineSettings) -> RunSummary:
    """Everything the flow does, for callers that already hold settings (CLI, tests).

    Raises:
        RunNotStartedError: a check failed; nothing was scheduled.
    """
    logger = get_run_logger()
    started = time.monotonic()
    checked = preflight(settings, claim=True)  # before any work is scheduled
    store = Store(settings.results_root)
    for leftover in store.sweep_stale_temps():
        logger.info("removed %s, a temp file an earlier run was killed while writing", leftover)
    context = FlowRunContext.get()
    run_id = new_run_id(str(context.flow_run.id) if context and context.flow_run else None)
    # Every intermediate this run writes carries its id, so reports count what it produced (`new`).
    provenance = checked.provenance.model_copy(update={"run_id": run_id})
    try:
        plan, refused, settled = build_plan(settings, provenance, checked.model, worker_count(settings), run_id)
    except FileNotFoundError as e:  # the root vanished since the check
        raise RunNotStartedError(str(e)) from e
    for old in prune_runs(settings.results_root, current=run_id):
        logger.debug("removed the plan of run %s", old)
    logger.info(
        "found %d audio files in %d folders under %s (%d refused); %d folders (%d files) unchanged since "
        "their last merge, left alone; plan: %d shards, %d merge groups at %s",
        plan.files, plan.folders, settings.audio_root, plan.refused, plan.settled_folders, plan.settled_files,
        plan.shards, len(plan.groups), plan.location,
    )
    for e in refused[:10]:
        logger.warning("refused %s: %s", e.id, e.error)
    progress = start_progress(plan.shards)
    runner = context.task_runner if context else None
    if plan.shards or plan.groups:  # work left: start the cluster (an unchanged rerun starts none)
        share_api_url_with_workers()
        if isinstance(runner, PipelineTaskRunner):
            runner.start(settings, tokenising=plan.shards > 0)
    reports = sorted([*settled, *process_plan(plan, settings, progress)], key=lambda r: r.folder)
    folders = {r.folder for r in reports}
    # Kept, not deleted: an unreadable mount or a narrower --extensions also makes folders vanish.
    stale = sorted(store.folders_with_results() - folders)
    if stale:
        logger.warning(
            "%d folder(s) have results but no audio under %s any more (kept; delete them if those "
            "speakers were removed on purpose): %s", len(stale), settings.audio_root,
            ", ".join(f"{f}.jsonl" for f in stale[:10]),
        )
    refused_at = write_refused(store, refused)  # outlives the plan, which later runs prune
    summary = summarise(reports, settings, time.monotonic() - started, stale, refused)
    summary = summary.model_copy(update={"refused_errors": refused_at})
    if summary.removed:
        logger.warning(
            "%d line(s) written by earlier runs are gone from the results (their files were not listed "
            "by this run and are gone, or no longer match it): %s", summary.removed,
            "; ".join(f"{r.id}: {r.reason}" for r in summary.removed_ids[:5]),
        )
    if summary.kept:
        logger.info("%d line(s) kept for files this run did not list (still on the audio root, still valid)",
                    summary.kept)
    manifest = write_manifest(
        settings.results_root, settings=settings, health=checked.health, summary=summary, run_id=run_id,
        tokenizer_settings=provenance.tokenizer_settings,
    )
    if settings.export_formats:  # after the manifest: exports carry it
        exports, export_errors = run_exports(settings)
        summary = summary.model_copy(update={"exports": exports, "export_errors": export_errors})
    publish_run_artifacts(
        reports, settings.results_root, wall_seconds=summary.wall_seconds, audio_root=settings.audio_root,
        stale_folders=stale, exports=list(summary.exports.items()),
    )
    logger.info(
        "%d files: %d new, %d reused, %d failed, %d flagged -> %d lines; %.3f audio hours, %.1f new files/s; "
        "results in %s (manifest %s)",
        summary.files, summary.new, summary.files - summary.new - summary.failed, summary.failed,
        summary.flagged, summary.lines, summary.audio_hours, summary.new / max(summary.wall_seconds, 1e-9),
        store.display("").rstrip("/"), manifest,
    )
    return summary


def process_plan(plan: RunPlan, settings: PipelineSettings, progress: Progress) -> list[FolderReport]:
    """Submit both stages per shard, each group's merge once its shards are done; collect reports."""
    import dask  # here, not at import: a rerun with nothing to do never loads Dask

    logger = get_run_logger()
    gpu = uses_gpu_resources(settings)
    stage_futures: dict[str, PrefectFuture] = {}
    # Long recordings: the VAD tasks first; a shard of their segments waits for them (and runs
    # even if one failed: it then finds no segment list, and merge reports that file).
    segmenting = [segment_task.submit(plan.location, j, settings) for j in range(plan.segment_tasks)]
    for i in range(plan.shards):
        after = [allow_failure(segmenting[j]) for j in plan.long_shards.get(i, [])] or None
        stage_futures[f"transcribe-{i}"] = transcribe_shard.submit(plan.location, i, settings, wait_for=after)
        with dask.annotate(resources={GPU_RESOURCE: 1}) if gpu else contextlib.nullcontext():
            stage_futures[f"tokenise-{i}"] = tokenise_shard.submit(plan.location, i, settings, wait_for=after)
    key_of = {f.task_run_id: key for key, f in stage_futures.items()}
    waiting = {g.index: {f"{s}-{i}" for i in g.shards for s in STAGES} for g in plan.groups}
    failed: dict[str, str] = {}
    merges: dict[int, PrefectFuture] = {}

    def submit_merge(index: int) -> None:
        group = plan.groups[index]
        mine = {k: failed[k] for k in sorted({f"{s}-{i}" for i in group.shards for s in STAGES}) if k in failed}
        merges[index] = merge_folders.submit(plan.location, index, group.label, settings, mine)

    for index, keys in waiting.items():
        if not keys:  # folders whose every file was refused at discovery
            submit_merge(index)
    groups_of: dict[str, list[int]] = {}
    for index, keys in waiting.items():
        for key in keys:
            groups_of.setdefault(key, []).append(index)

    stages_done: dict[int, int] = {}
    client = runner_client()
    watchdog = NoWorkersWatchdog(client, settings.no_workers_timeout_s) if client else None
    gave_up = watchdog.gave_up if watchdog else threading.Event()  # never set without a Dask client
    with watchdog or contextlib.nullcontext(), terminal_progress(settings.show_progress, total=len(stage_futures)) as advance:
        for done, future in enumerate(finished(list(stage_futures.values()), gave_up), start=1):
            key = key_of[future.task_run_id]
            reason = failure_reason(future)
            if reason is not None:
                failed[key] = reason
                logger.error("%s failed (its files will be reported failed with this reason): %s", key, reason)
            shard = int(key.rsplit("-", 1)[1])
            stages_done[shard] = stages_done.get(shard, 0) + 1
            if stages_done[shard] == len(STAGES):
                report_progress(progress, sum(n == len(STAGES) for n in stages_done.values()))
            advance(1)
            for index in groups_of.get(key, []):
                waiting[index].discard(key)
                if not waiting[index] and not gave_up.is_set():
                    submit_merge(index)
        reports: dict[int, list[FolderReport]] = {}
        index_of = {f.task_run_id: i for i, f in merges.items()}
        for future in finished(list(merges.values()), gave_up):
            reports[index_of[future.task_run_id]] = future.result()
    if gave_up.is_set():
        unfinished = [k for k, f in stage_futures.items() if not f.state.is_final()]
        logger.error(
            "the Dask cluster has had no workers for %.0f s: giving up on %d unfinished shard-stages "
            "and merging %d folder groups in this process (unfinished files are reported as failed; "
            "finished work is kept, so a rerun does only what is missing). Start workers, then run again.",
            settings.no_workers_timeout_s, len(unfinished), len(plan.groups) - len(reports),
        )
        watchdog.cancel([*stage_futures.values(), *merges.values()])
        for key in unfinished:
            failed.setdefault(key, f"never ran: the Dask cluster had no workers for {settings.no_workers_timeout_s:.0f} s")
        for group in plan.groups:  # in this process: there is no worker to run them
            if group.index not in reports:
                mine = {k: v for k, v in failed.items() if int(k.rsplit("-", 1)[1]) in group.shards}
                reports[group.index] = merge_group(plan.location, group.index, settings, mine)
    return [report for i in sorted(reports) for report in reports[i]]


def runner_client():
    """The Dask client of this flow's task runner, or None (another runner was chosen)."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    if isinstance(runner, PipelineTaskRunner):
        return runner.client if runner.dask is not None else None  # not started: nothing to do
    return getattr(runner, "client", None)


def failure_reason(future: PrefectFuture) -> str | None:
    """The failed task's exception as text (bounded), or None when it completed."""
    future.wait()
    state = future.state
    if state.is_completed():
        return None
    error = state.result(raise_on_failure=False)
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (state.message or state.name)
    return f"the {state.name.lower()} task {future.task_run_id} ended with {text}"[:REASON_CHARS]


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
    """A rich progress bar over shard-stages (each shard is transcribed and tokenised), or a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("shard-stages"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task_id = bar.add_task("stages", total=total)
        yield lambda n: bar.advance(task_id, n)


def summarise(
    reports: list[FolderReport], settings: PipelineSettings, wall_seconds: float, stale_folders: list[str] = (),
    refused: list[FileError] = (),
) -> RunSummary:
    files = sum(r.files for r in reports) + len(refused)
    errors = [e for r in reports for e in r.errors] + list(refused)
    # Clips moved out by --drop-flagged are a choice, not a failure: counted as flagged only.
    # Files, like `files`: a long recording with failed segments is one failed file (lines name them).
    failed = {source_id(e.id) for e in errors if e.stage != "quality"}
    return RunSummary(
        folders=len(reports), files=files, lines=sum(r.lines for r in reports),
        failed=len(failed), audio_hours=sum(r.audio_seconds for r in reports) / 3600,
        wall_seconds=wall_seconds, files_per_second=files / wall_seconds if wall_seconds > 0 else 0.0,
        results_root=settings.results_root, errors=errors, stale_folders=list(stale_folders),
        new=sum(r.new for r in reports), flagged=sum(r.flagged for r in reports),
        removed=sum(r.removed for r in reports),
        removed_ids=[x for r in reports for x in r.removed_ids][:REMOVED_SHOWN],
        kept=sum(r.kept for r in reports),
    )

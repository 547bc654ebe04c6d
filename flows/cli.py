"""`audio-pipeline`: flags map 1:1 onto settings; each command parses and makes one call."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

DEMO_DATA = Path(__file__).parent / "demo_data"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Folders of speech recordings -> JSONL with Whisper transcriptions and audio tokens."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for ours in ("flows", "tasks", "whisper_service", "deployments"):
        logger = logging.getLogger(ours)
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
    # Dask logs every worker start/stop at INFO; its config reads env before distributed is imported.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "debug" if verbose else "warning")
    # The ephemeral Prefect API starts in a subprocess; a loaded 2-core machine needs > 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@main.command()
@click.option("--host", default=None, help="Bind address (default 127.0.0.1; WHISPER_HOST).")
@click.option("--port", type=int, default=None, help="Port (default 8000; WHISPER_PORT).")
@click.option("--engine", type=click.Choice(["auto", "openai-whisper", "faster-whisper"]), default=None,
              help="auto (default): faster-whisper int8 on CPU, openai-whisper fp16 on CUDA; WHISPER_ENGINE.")
@click.option("--model", default=None, help="tiny.en (bundled, offline) or a local path.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--max-batch-size", type=int, default=None, help="Requests per batched forward pass.")
@click.option("--max-wait-ms", type=float, default=None, help="How long to gather a batch.")
@click.option("--language", default=None, help="Language when a request names none (default: detect).")
@click.option("--beam-size", type=int, default=None,
              help="Beam width at temperature 0 (default: faster-whisper 5, openai-whisper 1).")
@click.option("--best-of", type=int, default=None, help="Samples per clip at fallback temperatures (default 5).")
@click.option("--temperatures", default=None,
              help="Fallback ladder, comma-separated (default 0,0.2,0.4,0.6,0.8,1); '0' turns fallback off.")
@click.option("--compression-ratio-threshold", type=float, default=None, help="Re-decode above this (default 2.4).")
@click.option("--log-prob-threshold", type=float, default=None, help="Re-decode below this (default -1.0).")
@click.option("--no-speech-threshold", type=float, default=None, help="Silence above this (default 0.6).")
@click.option("--compute-type", default=None, help="auto (default), float32, float16, int8, ...")
@click.option("--initial-prompt", default=None, help="Text every decode is conditioned on.")
def serve(temperatures: str | None, **flags) -> None:
    """Run the Whisper transcription service (FastAPI)."""
    from whisper_service.app import serve as serve_app
    from whisper_service.settings import WhisperServiceSettings

    values = {k: v for k, v in flags.items() if v is not None}
    if temperatures is not None:
        try:
            values["temperatures"] = tuple(float(t) for t in temperatures.split(",") if t.strip())
        except ValueError as e:
            raise click.BadParameter(f"{temperatures!r}: {e}", param_hint="--temperatures") from e
    try:
        settings = WhisperServiceSettings(**values)
    except ValueError as e:  # pydantic's ValidationError: bad settings, exit 2, no traceback
        raise click.UsageError(str(e)) from e
    serve_app(settings)


def _pipeline_options(f):
    options = [
        click.option("--results", "results_root", default=None, help="Results root (path or fsspec URL; default results)."),
        click.option("--service-url", default=None, help="Whisper service URL (default http://localhost:8000)."),
        click.option("--tokenizer", default=None, help="Tokeniser: rpq (default), simulated, encodec."),
        click.option("--batch-size", type=int, default=None, help="Files per batch (default 32)."),
        click.option("--workers", "n_workers", type=int, default=None, help="Local Dask workers (CPU)."),
        click.option("--dask-address", default=None, help="Use an existing Dask scheduler."),
        click.option("--extensions", default=None, help="Comma-separated suffixes (default .flac,.wav,.mp3,.ogg)."),
        click.option("--with-quality", is_flag=True, default=None, help="Add a `quality` object to each JSONL line."),
        click.option("--drop-flagged", is_flag=True, default=None,
                     help="Move clips with quality flags to {folder}.errors.jsonl (stage quality)."),
        click.option("--max-failed-fraction", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Failed files (0..1 of all) a run may have and still exit 0 / end Completed (default 0)."),
        click.option("--verify-content", is_flag=True, default=None,
                     help="Add each file's sha256 to its identity (reads every file each run): for files "
                          "rewritten in place with size and mtime preserved."),
        click.option("--export", "export_formats", default=None,
                     help="Comma-separated formats to export into at the end: lhotse,hf,webdataset,nemo."),
        click.option("--export-root", default=None,
                     help="Local directory for those exports, one folder per format (default RESULTS-exports)."),
        click.option("--segment-over", "segment_over_s", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Cut files longer than SECONDS into speech segments, one line each (default 30)."),
        click.option("--no-segment", is_flag=True, default=None, help="Keep every file whole, however long."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


EXIT_CODES = """\b
Exit codes:
  0  every file has a line (or the failed ones are within --max-failed-fraction)
  1  some files failed: listed here and in RESULTS/{folder}.errors.jsonl; or an --export
     failed or left lines out (the JSONL is written)
  2  the run could not start: bad or missing audio root, results root not writable or owned
     by another audio root, service unreachable or refusing the token, bad settings, root not
     in AUDIO_PIPELINE_ALLOWED_ROOTS; checked before any work, one line, nothing sent
  3  an unexpected crash (with its traceback)
"""


@main.command(epilog=EXIT_CODES)
@click.argument("audio_root")
@_pipeline_options
def run(audio_root: str, **flags) -> None:
    """Transcribe and tokenise AUDIO_ROOT into RESULTS/{folder}.jsonl."""

    _exit(_run_and_report(audio_root=audio_root, **flags))


@main.command()
@click.option("--results", "results_root", default="results", help="Where to write the demo results.")
@click.option("--port", type=int, default=0, help="Service port (0: a free one).")
def demo(results_root: str, port: int) -> None:
    """Start the Whisper service, run the flow on the bundled demo corpus, show results, stop."""
    from flows.demo import demo_corpus, local_service
    from flows.prefect_api import prefect_api
    from tasks.settings import PipelineSettings

    # The bundled clips plus one long recording built from them, so the output shows segments.
    audio_root = demo_corpus(DEMO_DATA / "audio", Path(f"{results_root.rstrip('/')}-demo-audio"))
    settings = PipelineSettings(audio_root=str(audio_root), results_root=results_root)
    click.echo("starting the Whisper service on 127.0.0.1 (bundled tiny.en, offline)...")
    # The local Prefect server (when no API is configured) starts beside the service.
    with prefect_api(settings.prefect_server, settings.prefect_server_idle_s), local_service(port=port) as url:
        code = _run_and_report(
            audio_root=str(audio_root), results_root=results_root, service_url=url, preview=3
        )
    _exit(code)


@main.command()
@click.argument("audio_root", type=click.Path(exists=True, file_okay=False))
@click.option("--stable-seconds", type=float, default=1.0,
              help="How long a file's size must stay unchanged before it counts as written.")
def watch(audio_root: str, stable_seconds: float) -> None:
    """Emit the Prefect event audio.file.created per new audio file under AUDIO_ROOT.

    Sends to PREFECT_API_URL; the deployment's trigger (prefect.yaml) starts the runs. Ctrl-C stops.
    """
    from deployments.watcher import WatcherConfigError
    from deployments.watcher import watch as watch_root

    try:
        watch_root(audio_root, stable_seconds=stable_seconds)
    except WatcherConfigError as e:
        raise click.ClickException(str(e)) from e


@main.command("crash-unresponsive-runs")
@click.option("--heartbeat-seconds", type=int, default=None,
              help="The flow runs' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (default: this environment's, 180).")
@click.option("--missed", type=int, default=3, show_default=True, help="Heartbeats missed before a run is Crashed.")
def crash_unresponsive_runs(heartbeat_seconds: int | None, missed: int) -> None:
    """Create (or update) the automation that marks runs whose process died as Crashed."""
    from deployments.unresponsive import AUTOMATION_NAME, ensure_unresponsive_runs_automation

    automation_id = ensure_unresponsive_runs_automation(heartbeat_seconds, missed)
    click.echo(f"automation {AUTOMATION_NAME!r} ({automation_id}) is in place")


@main.command("export")
@click.argument("results_root")
@click.option("--format", "fmt", type=click.Choice(["lhotse", "hf", "webdataset", "nemo"]), required=True,
              help="lhotse manifests, Hugging Face Parquet, WebDataset tars or NeMo manifests.")
@click.option("--out", required=True, help="Local directory to write the export into (rerun to resume).")
@click.option("--shard-size", default="10000",
              help="Samples per shard (an integer), or bytes with a unit (500MB, 1GiB).")
@click.option("--with-audio", is_flag=True, help="hf: embed each file's bytes in an `audio` column.")
@click.option("--shar", is_flag=True, help="lhotse: write Lhotse Shar (cuts + FLAC tar) instead of jsonl.gz.")
@click.option("--audio-root", default=None, help="Where the audio is, over the manifest's (moved audio, no manifest).")
def export_results(results_root: str, fmt: str, out: str, shard_size: str, with_audio: bool, shar: bool,
                   audio_root: str | None) -> None:
    """Export RESULTS_ROOT's {folder}.jsonl lines for training (docs/EXPORT.md)."""
    from tasks.export import ExportError, export

    try:
        report = export(results_root, fmt, out, shard_size=shard_size, with_audio=with_audio, shar=shar,
                        audio_root=audio_root, progress=lambda message: click.echo(message, err=True))
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"{report.samples} of {report.lines} lines -> {report.shards} {fmt} shard(s) in {report.out}"
        f" ({report.reused_shards} already complete, kept); {report.wall_seconds:.1f} s"
    )
    if not report.manifest:
        click.echo(f"note: {results_root} has no manifest.json; the export says nothing about its tokens", err=True)
    if report.failed:
        click.echo(f"{report.failed} line(s) not exported; see {report.out}/export.errors.jsonl", err=True)
        for e in report.errors[:10]:
            click.echo(f"  {e.id}: {e.error}", err=True)
        sys.exit(1)

def _exit(code: int) -> None:
    """Exit with `code`, sparing the interpreter its last full garbage collection.

    With torch, Prefect and Dask loaded, that collection took ~1 s on 2 cores after the run's
    work and output were done (measured: 1.3 s -> 0.3 s from the last line to exit).
    `gc.freeze()` puts every object out of the collector's reach; atexit handlers and Prefect's
    log and event drains still run, and the OS frees the memory.
    """
    gc.freeze()
    sys.exit(code)


def _run_and_report(preview: int = 0, **parameters) -> int:
    """Run the flow with the given parameters (None: settings default), print the summary.

    Returns the exit code (see EXIT_CODES): 3, with the traceback, for anything unexpected.
    """
    try:
        return _run(preview, **parameters)
    except Exception:  # the one place a crash becomes an exit code; the traceback is shown
        traceback.print_exc()
        click.echo("error: the run crashed (exit 3); the traceback above says where", err=True)
        return 3


def _run(preview: int, **parameters) -> int:
    from tasks.preflight import RunNotStartedError, check_roots, preflight, settings_or_error

    # None (and an unset on/off flag): not given, so the environment or the default decides.
    parameters = {k: v for k, v in parameters.items() if v is not None and v is not False}
    # The flow builds its settings from parameters + environment; the bar is a terminal matter.
    os.environ.setdefault("AUDIO_PIPELINE_SHOW_PROGRESS", str(sys.stderr.isatty()).lower())
    for name in ("extensions", "export_formats"):
        if name in parameters:
            parameters[name] = parameters[name].split(",")
    segmentation = {k: parameters.pop(k) for k in ("segment_over_s", "no_segment") if k in parameters}
    if segmentation:  # one nested settings group (`SegmentOptions`), as the flow takes it
        parameters["segmentation"] = segmentation
    from flows.prefect_api import prefect_api

    # Here, before the flow: a run that cannot start says so in one line (exit 2). The flow checks
    # again (deployment runs come through it alone) and claims the results root.
    try:
        settings = settings_or_error(**parameters)
        check_roots(settings)  # milliseconds: a mistyped root costs no Prefect server
    except RunNotStartedError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    # The temporary Prefect server (when no API is configured) starts now, on the other core,
    # while this process asks the service and imports the flow: not after, as Prefect would.
    with prefect_api(settings.prefect_server, settings.prefect_server_idle_s) as server:
        try:
            preflight(settings)
        except RunNotStartedError as e:
            click.echo(f"error: {e}", err=True)
            return 2
        if server is not None and server.process is not None:
            # This run waits for the server it just started: build the tokeniser meanwhile, on the
            # core the server leaves, instead of beside the first transcriptions.
            from flows.runner import runs_tasks_in_this_process, warm_tokeniser

            if runs_tasks_in_this_process(settings):
                warm_tokeniser(settings)
        from flows.pipeline import parallel_transcribe_tokenise

        if server is not None:
            server.wait_ready()
            if server.process is not None and settings.prefect_server == "keep":
                click.echo(f"started a local Prefect server at {server.api_url}, kept for the next run: it stops after "
                           f"{settings.prefect_server_idle_s:.0f} s without a request "
                           "(AUDIO_PIPELINE_PREFECT_SERVER=temporary: one per run)", err=True)
        state = parallel_transcribe_tokenise(**parameters, return_state=True)
        return _report(state, preview)


def _report(state, preview: int) -> int:
    """Print the run's summary (or its one-line refusal); returns the exit code."""
    from flows.pipeline import summary_of
    from tasks.preflight import RunNotStartedError

    try:
        summary = summary_of(state)
    except RunNotStartedError as e:  # e.g. the audio root vanished between the checks
        click.echo(f"error: {e}", err=True)
        return 2
    click.echo("")
    click.echo(f"{'folders':>8} {'files':>7} {'new':>7} {'lines':>7} {'failed':>7} {'flagged':>7} {'removed':>7}"
               f" {'audio h':>8} {'files/s':>8}")
    click.echo(
        f"{summary.folders:>8} {summary.files:>7} {summary.new:>7} {summary.lines:>7} {summary.failed:>7}"
        f" {summary.flagged:>7} {summary.removed:>7} {summary.audio_hours:>8.3f} {summary.files_per_second:>8.2f}"
    )
    if summary.removed:
        click.echo(f"note: {summary.removed} line(s) of earlier runs were removed from the results:", err=True)
        for r in summary.removed_ids[:5]:
            click.echo(f"  {r.id}: {r.reason}", err=True)
    if summary.kept:
        click.echo(f"note: {summary.kept} line(s) kept for files this run did not list (still there, still valid)",
                   err=True)
    if summary.flagged:
        click.echo(f"{summary.flagged} clip(s) carry quality flags: {summary.results_root}/*.jsonl with --with-quality"
                   " shows them; the run's `worst-flagged-clips` artifact lists the worst")
    click.echo(f"results: {summary.results_root}/{{folder}}.jsonl")
    if summary.stale_folders:
        click.echo(f"note: {len(summary.stale_folders)} folder(s) in the results have no audio any more, kept: "
                   + ", ".join(f"{f}.jsonl" for f in summary.stale_folders[:5]), err=True)
    if preview:
        _print_preview(summary.results_root, preview)
    for fmt, out in summary.exports.items():
        click.echo(f"export {fmt}: {out}")
    for problem in summary.export_errors:
        click.echo(f"error: {problem}", err=True)
    if summary.failed:
        where = f"{summary.results_root}/{{folder}}.errors.jsonl"
        if summary.refused_errors:
            where += f" and {summary.refused_errors} (refused at discovery)"
        click.echo(f"{summary.failed} file(s) failed; see {where}", err=True)
        for e in summary.errors[:10]:
            click.echo(f"  {e.id} [{e.stage}] {e.error}", err=True)
    return 1 if state.is_failed() else 0


def _print_preview(results_root: str, n: int) -> None:
    first = sorted(Path(results_root).glob("*.jsonl"))
    first = [p for p in first if not p.name.endswith(".errors.jsonl")][:1]
    for path in first:
        click.echo(f"first lines of {path}:")
        for line in path.read_text().splitlines()[:n]:
            record = json.loads(line)
            tokens = record["token_array"]
            click.echo(f'  {record["id"]}: "{record["transcription"]}" tokens[{len(tokens)}]={tokens[:8]}...')


if __name__ == "__main__":
    main()

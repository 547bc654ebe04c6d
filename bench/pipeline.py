"""Benchmark the flow against the original system's shape and the raw engine (not a test).

(a) this flow: shards, both stages in parallel, batched service;
(b) the original shape: one Prefect task and one unbatched HTTP request per file (service with
    max batch size 1), tokenisation one task per file too;
(c) the raw openai-whisper engine in-process, batched, over the same files (transcription only).
Prints JSON and writes bench/results/pipeline-<device>.json. Goals on a 2-core CPU:
(a)/(c) >= 0.9 and (a)/(b) >= 3.

    uv run python bench/pipeline.py --files 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.common import machine, make_corpus, setup_prefect_env, timed, write_json  # noqa: E402


def run_flow(audio: Path, results: Path, url: str, batch_size: int) -> None:
    from flows.pipeline import parallel_transcribe_tokenise

    summary = parallel_transcribe_tokenise(
        audio_root=str(audio), results_root=str(results), service_url=url, batch_size=batch_size
    )
    assert summary.failed == 0, summary.errors[:3]


def run_original_shape(audio: Path, results: Path, url: str) -> None:
    """One task per file per stage, one unbatched request per file: what the prototype did."""
    from prefect import flow, task
    from prefect.cache_policies import NONE

    from flows.runner import make_task_runner
    from tasks.discover import list_audio
    from tasks.preflight import preflight
    from tasks.records import Batch
    from tasks.settings import PipelineSettings
    from tasks.storage import Store
    from tasks.tokenise import tokenise_batches
    from tasks.transcribe import transcribe_files

    settings = PipelineSettings(audio_root=str(audio), results_root=str(results), service_url=url)
    checked = preflight(settings)
    files, _ = list_audio(settings.audio_root, settings.extensions)

    @task(cache_policy=NONE)
    def transcribe_one(file):
        return transcribe_files([file], settings, Store(settings.results_root), checked.provenance, 0)

    @task(cache_policy=NONE)
    def tokenise_one(file):
        return tokenise_batches(
            [Batch(folder=file.folder, files=[file])], settings, Store(settings.results_root), checked.provenance, 0)

    @flow(task_runner=make_task_runner(settings))
    def original(files):
        futures = transcribe_one.map(files) + tokenise_one.map(files)
        for f in futures:
            f.wait()

    original(files)


def run_raw_engine(audio: Path, batch_size: int) -> None:
    from whisper_service.audio import decode_audio
    from whisper_service.engines import load_engine

    engine = load_engine("openai-whisper", "tiny.en", "auto")
    paths = sorted(audio.rglob("*.flac"))
    for start in range(0, len(paths), batch_size):
        engine.transcribe([decode_audio(p.read_bytes()) for p in paths[start : start + batch_size]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="service batch and flow batch")
    parser.add_argument("--skip-original", action="store_true", help="skip (b): 2 tasks per file is slow")
    args = parser.parse_args()
    setup_prefect_env()
    from flows.demo import local_service

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        audio_seconds = make_corpus(tmp_path / "audio", args.files)
        figures: dict[str, dict] = {}

        seconds, _ = timed(run_raw_engine, tmp_path / "audio", args.batch_size)
        figures["raw_engine"] = {"seconds": seconds}
        batched = ("--max-batch-size", str(args.batch_size), "--max-wait-ms", "20")
        with local_service(extra_args=batched) as url:
            seconds, _ = timed(run_flow, tmp_path / "audio", tmp_path / "flow", url, args.batch_size)
            figures["flow"] = {"seconds": seconds}
        if not args.skip_original:
            with local_service(extra_args=("--max-batch-size", "1")) as url:
                seconds, _ = timed(run_original_shape, tmp_path / "audio", tmp_path / "original", url)
                figures["original_shape"] = {"seconds": seconds}

    for f in figures.values():
        f["files_per_second"] = args.files / f["seconds"]
        f["audio_seconds_per_second"] = audio_seconds / f["seconds"]
    ratios = {"flow_over_raw_engine": figures["flow"]["files_per_second"] / figures["raw_engine"]["files_per_second"]}
    if "original_shape" in figures:
        ratios["flow_over_original_shape"] = (
            figures["flow"]["files_per_second"] / figures["original_shape"]["files_per_second"]
        )
    write_json("pipeline", {
        "benchmark": "pipeline", "files": args.files, "audio_seconds": audio_seconds,
        "batch_size": args.batch_size, "machine": machine(), "figures": figures, "ratios": ratios,
        "goals": {"flow_over_raw_engine": 0.9, "flow_over_original_shape": 3.0},
    })


if __name__ == "__main__":
    main()

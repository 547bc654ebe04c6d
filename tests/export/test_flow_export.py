"""Exports at the end of a flow run (`export_formats`), on the real flow, service and Prefect.

The formats themselves are proven in test_formats.py with their own libraries; here: the flow
writes them beside the results (never inside), from the lines it just wrote, one task run per
format; a rerun with nothing new still exports; an export that fails fails the run (exit 1
semantics) without costing the JSONL.
"""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pytest

from flows.pipeline import parallel_transcribe_tokenise, summary_of
from tasks.preflight import RunNotStartedError
from tests.conftest import DEMO_AUDIO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def small_corpus(root: Path) -> Path:
    for clip in sorted(DEMO_AUDIO.rglob("*.flac"))[:4]:
        target = root / clip.relative_to(DEMO_AUDIO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, target)
    return root


def run(audio: Path, results: Path, url: str, **kwargs):
    return parallel_transcribe_tokenise(
        audio_root=str(audio), results_root=str(results), service_url=url, tokenizer="simulated", n_workers=1,
        return_state=True, **kwargs,
    )


def jsonl_lines(results: Path) -> dict[str, dict]:
    return {
        line["id"]: line
        for p in results.glob("*.jsonl") if not p.name.endswith(".errors.jsonl")
        for line in map(json.loads, p.read_text().splitlines())
    }


def test_the_flow_exports_beside_the_results_a_rerun_exports_again_a_failed_export_fails_the_run(tmp_path, whisper_service_url):
    import datasets

    audio, results = small_corpus(tmp_path / "audio"), tmp_path / "results"
    state = run(audio, results, whisper_service_url, export_formats=["nemo", "hf"])
    summary = summary_of(state)
    assert state.is_completed(), state.message
    exports = tmp_path / "results-exports"
    assert summary.exports == {"nemo": str(exports / "nemo"), "hf": str(exports / "hf")}
    assert summary.export_errors == [] and not list(results.rglob("manifest_*.json"))  # nothing inside the results
    lines = jsonl_lines(results)
    assert len(lines) == 4
    nemo = [json.loads(x) for p in sorted((exports / "nemo").glob("manifest_*.json")) for x in p.read_text().splitlines()]
    assert {e["id"]: e["text"] for e in nemo} == {i: line["transcription"] for i, line in lines.items()}
    assert all(Path(e["audio_filepath"]) == audio / e["id"] for e in nemo)
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{exports}/hf/data/*.parquet")),
                               split="train", cache_dir=str(tmp_path / "cache"))
    assert {row["id"]: row["token_array"] for row in ds} == {i: line["token_array"] for i, line in lines.items()}
    assert json.loads((exports / "hf" / "manifest.json").read_text())["run_id"]  # exports carry the manifest

    before = {p: p.stat().st_mtime_ns for p in exports.rglob("*.parquet")}
    again = run(audio, results, whisper_service_url, export_formats=["hf"])  # nothing new: exports still run
    assert again.is_completed() and summary_of(again).exports == {"hf": str(exports / "hf")}
    assert {p: p.stat().st_mtime_ns for p in exports.rglob("*.parquet")} == before  # unchanged shards kept

    # An export that fails fails the run, and costs no line.
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the export directory should be\n")
    state = run(audio, results, whisper_service_url, export_formats=["nemo"], export_root=str(blocked))
    summary = summary_of(state)
    assert state.is_failed() and "export nemo" in state.message
    assert summary.failed == 0 and jsonl_lines(results) == lines and summary.exports == {}
    assert len(summary.export_errors) == 1 and "export nemo" in summary.export_errors[0]


def test_an_export_root_inside_the_results_or_an_unknown_format_stops_the_run_before_any_work(tmp_path, whisper_service_url):
    audio, results = small_corpus(tmp_path / "audio"), tmp_path / "results"
    with pytest.raises(RunNotStartedError, match="inside the results root"):
        parallel_transcribe_tokenise(audio_root=str(audio), results_root=str(results), service_url=whisper_service_url,
                                     export_formats=["nemo"], export_root=str(results / "exports"))
    with pytest.raises(RunNotStartedError, match="unknown export format"):
        parallel_transcribe_tokenise(audio_root=str(audio), results_root=str(results), service_url=whisper_service_url,
                                     export_formats=["tfrecord"])
    assert not results.exists() or not list(results.glob("*.jsonl"))

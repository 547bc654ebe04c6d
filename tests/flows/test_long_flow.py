"""Long recordings through the real flow: the VAD task (`segment-long`), both stages per shard and
merge, on the Prefect harness, a real Dask LocalCluster and the real service (issue 22).

Two espeak-ng FLACs of ~40 s (one 44.1 kHz stereo) and a short demo clip in one folder, a short
clip in another; the simulated tokeniser (tokens do not matter here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.pipeline import parallel_transcribe_tokenise, summary_of
from tasks.records import SegmentList, line_order, split_segment_id
from tasks.segments import segment_list_path
from tests.conftest import DEMO_AUDIO
from tests.fixtures.longform import make_long_recording
from tests.metrics import transcribe_requests

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

LONG = ("book/ch01.flac", "book/ch02.flac")
SHORT = ("book/intro.flac", "p225/p225_001_mic2.flac")


def task_run_names(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.name for r in runs)


def run(audio: Path, results: Path, url: str):
    state = parallel_transcribe_tokenise(
        audio_root=str(audio), results_root=str(results), service_url=url, n_workers=1, tokenizer="simulated",
        return_state=True,
    )
    return summary_of(state), task_run_names(state.state_details.flow_run_id)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_long_files_go_through_the_vad_task_and_an_unchanged_rerun_redoes_nothing(tmp_path, whisper_service_url):
    audio, results = tmp_path / "audio", tmp_path / "results"
    make_long_recording(audio / LONG[0], 38, seed=51)
    make_long_recording(audio / LONG[1], 36, rate=44_100, channels=2, seed=52, first_sentence=7)
    for file_id, clip in zip(SHORT, ("p225/p225_002_mic2.flac", "p225/p225_001_mic2.flac"), strict=True):
        (audio / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_AUDIO / clip, audio / file_id)

    before = transcribe_requests(whisper_service_url)
    summary, tasks = run(audio, results, whisper_service_url)
    sent = transcribe_requests(whisper_service_url) - before
    assert summary.failed == 0 and summary.errors == []
    assert [t for t in tasks if t.startswith("segment-long")] == ["segment-long-0"]  # the VAD task ran, once

    lines = read_lines(results / "book.jsonl")
    segments = [x for x in lines if "source_id" in x]
    assert [x["id"] for x in lines if "source_id" not in x] == ["book/intro.flac"]
    assert sorted({x["source_id"] for x in segments}) == list(LONG)
    for x in segments:
        assert split_segment_id(x["id"]) == (x["source_id"], x["start"], x["end"])
        assert 0 < x["end"] - x["start"] <= 30.0
        assert x["transcription"].strip() and x["token_array"]
    for source in LONG:
        spans = [(x["start"], x["end"]) for x in segments if x["source_id"] == source]
        assert len(spans) >= 2 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert [x["id"] for x in lines] == sorted((x["id"] for x in lines), key=line_order)  # by source, then start
    assert sent == len(lines) + 1  # one request per segment and per short clip (p225's included)
    # Files are audio files, lines are JSONL lines (segments included).
    assert (summary.files, summary.new, summary.lines) == (4, 4, len(lines) + 1)

    # Rerun, nothing changed: nothing planned, segmented, sent or produced again; outputs untouched.
    listings = {f: (results / segment_list_path(f)).read_bytes() for f in LONG}
    outputs = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.glob("*.jsonl")}
    before = transcribe_requests(whisper_service_url)
    again, tasks = run(audio, results, whisper_service_url)
    assert transcribe_requests(whisper_service_url) - before == 0
    assert tasks == []  # both folders settled: no VAD task, no shard, no merge, no cluster
    assert (again.files, again.new, again.lines, again.failed) == (4, 0, summary.lines, 0)
    assert {f: (results / segment_list_path(f)).read_bytes() for f in LONG} == listings
    for f in LONG:  # written by the first run, never again
        assert SegmentList.model_validate_json(listings[f]).run_id is not None
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in results.glob("*.jsonl")} == outputs

"""Long recordings through the plan, both stages and merge, on the real service (issue 22).

The flow's steps without Prefect or Dask: `build_plan`, the VAD tasks, each shard's transcribe and
tokenise task functions, each group's merge. Real espeak-ng FLAC (one 44.1 kHz stereo), the real
Whisper service (tiny.en) and the default rpq tokeniser.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from tasks.long_plan import load_segment_task
from tasks.merge import merge_group
from tasks.plan import build_plan, load_plan
from tasks.records import FolderReport, split_segment_id
from tasks.segments import segment_files, segment_list_path
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokenise_shard
from tasks.transcribe import transcribe_shard
from tests.conftest import DEMO_AUDIO
from tests.fixtures.longform import make_long_recording
from tests.metrics import transcribe_requests
from tests.tasks.steps import expect_for, read_jsonl
from tests.wer import wer

SHORT = ["p225/p225_001_mic2.flac", "p225/p225_002_mic2.flac"]


def run_plan(settings: PipelineSettings) -> list[FolderReport]:
    """One run as the flow does it, in process: plan, VAD tasks, stage tasks per shard, merges."""
    expect = expect_for(settings).model_copy(update={"run_id": uuid.uuid4().hex})
    health = {"fingerprint": expect.decode_fingerprint}
    run_id = f"20260101T000000Z-{uuid.uuid4().hex[:8]}"
    plan = build_plan(settings, expect, health.get("model"), n_workers=1, run_id=run_id).plan
    store = Store(settings.results_root)
    for j in range(plan.segment_tasks):
        segment_files(load_segment_task(plan.location, j).files, settings.segmentation, store, expect.run_id, j)
    for i in range(plan.shards):
        transcribe_shard.fn(plan.location, i, settings)
        tokenise_shard.fn(plan.location, i, settings)
    return [r for g in load_plan(plan.location).groups for r in merge_group(plan.location, g.index, settings, {})]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("longform")
    audio = root / "audio"
    for file_id in SHORT:
        (audio / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_AUDIO / file_id, audio / file_id)
    books = {
        "book/ch01.flac": make_long_recording(audio / "book/ch01.flac", 70, seed=11),
        "book/ch02.flac": make_long_recording(audio / "book/ch02.flac", 45, rate=44_100, channels=2, seed=12,
                                              voice="en-us+f3", first_sentence=9),
    }
    # A long file whose header is fine and whose frames are not: it cannot be segmented.
    broken = make_long_recording(audio / "book/ch03.flac", 40, seed=13).path
    data = bytearray(broken.read_bytes())
    data[20_000:] = bytes(len(data) - 20_000)
    broken.write_bytes(bytes(data))
    return root, audio, books


@pytest.mark.slow
def test_long_files_become_segment_lines(corpus, whisper_service_url):
    root, audio, books = corpus
    settings = PipelineSettings(audio_root=str(audio), results_root=str(root / "results"),
                                service_url=whisper_service_url, http_retries=0)
    before = transcribe_requests(whisper_service_url)
    reports = {r.folder: r for r in run_plan(settings)}
    store = Store(settings.results_root)
    lines = read_jsonl(store, "book.jsonl")
    sent = transcribe_requests(whisper_service_url) - before
    assert sent == len(lines) + len(SHORT)  # one request per segment: never a whole long file

    by_source: dict[str, list[dict]] = {}
    for line in lines:
        assert set(line) == {"id", "source_id", "start", "end", "transcription", "token_array"}
        assert split_segment_id(line["id"]) == (line["source_id"], line["start"], line["end"])
        assert 0 < line["end"] - line["start"] <= settings.segmentation.max_segment_s
        # rpq: 25 tokens per second of exactly this span.
        assert abs(len(line["token_array"]) - 25 * (line["end"] - line["start"])) <= 2
        by_source.setdefault(line["source_id"], []).append(line)
    assert sorted(by_source) == ["book/ch01.flac", "book/ch02.flac"]
    assert [(x["source_id"], x["start"]) for x in lines] == sorted((x["source_id"], x["start"]) for x in lines)
    for source, segs in by_source.items():
        assert len(segs) >= 2
        assert all(a["end"] <= b["start"] for a, b in zip(segs, segs[1:], strict=False))
        text = " ".join(s["transcription"] for s in segs)
        assert wer([books[source].reference], [text]) <= 0.3, text

    # The broken long file: one error line under its own id; the rest of the folder is kept.
    errors = read_jsonl(store, "book.errors.jsonl")
    assert [(e["id"], e["stage"]) for e in errors] == [("book/ch03.flac", "decode")]
    assert "cannot segment" in errors[0]["error"]
    assert reports["book"].lines == len(lines)

    # Short files: the contract's three fields, byte for byte as a run without long files writes them.
    alone = root / "alone"
    for file_id in SHORT:
        (alone / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(audio / file_id, alone / file_id)
    only_short = settings.model_copy(update={"audio_root": str(alone), "results_root": str(root / "alone-results")})
    run_plan(only_short)
    assert (root / "results" / "p225.jsonl").read_bytes() == (root / "alone-results" / "p225.jsonl").read_bytes()

    # Rerun: segment lists and per-segment results reused, nothing sent again, same lines.
    listing = store.read_bytes(segment_list_path("book/ch01.flac"))
    before = transcribe_requests(whisper_service_url)
    run_plan(settings)
    assert transcribe_requests(whisper_service_url) - before == 0
    assert read_jsonl(store, "book.jsonl") == lines
    assert store.read_bytes(segment_list_path("book/ch01.flac")) == listing

    # --no-segment: the same long file is one whole line again (its own lane on the service).
    whole = settings.model_copy(update={"segmentation": settings.segmentation.model_copy(update={"no_segment": True}),
                                        "results_root": str(root / "whole-results")})
    run_plan(whole)
    ids = [x["id"] for x in read_jsonl(Store(whole.results_root), "book.jsonl")]
    assert ids == ["book/ch01.flac", "book/ch02.flac"]
    assert json.loads((root / "results" / "p225.jsonl").read_text().splitlines()[0])["id"] == SHORT[0]

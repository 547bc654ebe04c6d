"""A segment whose transcription fails is one error line naming the segment; the rest of its file
is kept (issue 22, "Failures stay per item").

No mock: the real service, started with its own duration limit (`WHISPER_MAX_AUDIO_SECONDS`) set
between the longest segment of a real espeak-ng FLAC and the others, refuses exactly that one
segment (400, as it refuses any over-long upload). The run's steps are the flow's, in process
(`run_plan`); a rerun against a service without that limit then sends that segment alone.
"""

from __future__ import annotations

import pytest

from flows.demo import service_process
from flows.pipeline import summarise
from tasks.audio_stream import iter_blocks, open_source
from tasks.records import segment_id
from tasks.segments import segment_audio
from tasks.settings import PipelineSettings, SegmentOptions
from tasks.storage import Store
from tasks.vad import RATE, speech_probabilities
from tests.fixtures.longform import make_long_recording
from tests.metrics import transcribe_requests, transcribe_requests_by_status
from tests.tasks.steps import SIMULATED, read_jsonl
from tests.tasks.test_longform_stages import run_plan

SOURCE = "book/ch01.flac"


def cut(path: str) -> list[tuple[float, float]]:
    """The segments the VAD stage will cut (same code, same options: deterministic)."""
    with open_source(path) as f:
        probs, samples = speech_probabilities(iter_blocks(f, RATE))
    return [(s.start, s.end) for s in segment_audio(probs, round(samples / RATE, 3), SegmentOptions())]


@pytest.mark.slow
def test_one_failed_segment_is_one_error_line_and_the_other_segments_are_kept(tmp_path, whisper_service_url):
    audio = tmp_path / "audio"
    recording = make_long_recording(audio / SOURCE, 62, seed=43)
    spans = cut(str(recording.path))
    assert len(spans) >= 3
    by_length = sorted(spans, key=lambda s: s[1] - s[0])
    longest, second = by_length[-1], by_length[-2]
    assert (longest[1] - longest[0]) - (second[1] - second[0]) >= 2.0, spans  # room for a limit between them
    limit = ((longest[1] - longest[0]) + (second[1] - second[0])) / 2
    failing = segment_id(SOURCE, *longest)

    with service_process(env={"WHISPER_MAX_AUDIO_SECONDS": f"{limit:.1f}"}) as limited:
        settings = PipelineSettings(audio_root=str(audio), results_root=str(tmp_path / "results"),
                                    service_url=limited.url, http_retries=0, **SIMULATED)
        reports = {r.folder: r for r in run_plan(settings)}
        answered = transcribe_requests_by_status(limited.url)
    assert answered == {"200": len(spans) - 1, "400": 1}  # one request per segment; one refused

    store = Store(settings.results_root)
    lines = read_jsonl(store, "book.jsonl")
    assert [x["id"] for x in lines] == [segment_id(SOURCE, *s) for s in spans if s != longest]
    assert all(x["transcription"].strip() and x["token_array"] for x in lines)
    errors = read_jsonl(store, "book.errors.jsonl")
    assert [(e["id"], e["stage"]) for e in errors] == [(failing, "decode")]  # the service's 400: not audio it takes
    assert f"the limit is {limit:.0f} s" in errors[0]["error"]
    report = reports["book"]
    assert (report.lines, [e.id for e in report.errors]) == (len(spans) - 1, [failing])
    # Counted as a user counts: one audio file, failed (the error line names its segment), and
    # its other segments' lines.
    summary = summarise(list(reports.values()), settings, 1.0)
    assert (summary.files, summary.failed, summary.new, summary.lines) == (1, 1, 0, len(spans) - 1)
    assert [e.id for e in summary.errors] == [failing]

    # Rerun on a service without that limit: the failed segment alone is sent, and its line joins.
    settings = settings.model_copy(update={"service_url": whisper_service_url})
    before = transcribe_requests(whisper_service_url)
    reports = {r.folder: r for r in run_plan(settings)}
    assert transcribe_requests(whisper_service_url) - before == 1
    assert [x["id"] for x in read_jsonl(store, "book.jsonl")] == [segment_id(SOURCE, *s) for s in spans]
    assert store.read_bytes("book.errors.jsonl") is None
    assert (reports["book"].lines, reports["book"].errors) == (len(spans), [])
    summary = summarise(list(reports.values()), settings, 1.0)
    assert (summary.files, summary.failed, summary.new, summary.lines) == (1, 0, 1, len(spans))

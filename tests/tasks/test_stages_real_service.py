"""The stages and merge through the real Whisper service (default engine, tiny.en weights).

What the loopback contract server in the other tests stands in for, checked against the service
itself: its answers become intermediates with the engine, fingerprint and requested language, the
lines hold its text, and a rerun sends nothing again exactly when `/healthz` names a fingerprint.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tasks.records import Transcription
from tasks.storage import Store
from tests.conftest import DEMO_AUDIO, DEMO_REFERENCES
from tests.metrics import transcribe_requests
from tests.tasks.steps import expect_for, read_jsonl, run_steps, settings_for
from tests.wer import wer

IDS = ["p225/p225_001_mic2.flac", "p225/p225_002_mic2.flac"]


@pytest.mark.slow
def test_stages_and_merge_through_the_real_service(tmp_path, whisper_service_url):
    references = json.loads(DEMO_REFERENCES.read_text())
    audio = tmp_path / "audio"
    for file_id in IDS:
        (audio / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_AUDIO / file_id, audio / file_id)
    settings = settings_for(audio, str(tmp_path / "results"), whisper_service_url)
    store = Store(settings.results_root)
    expect = expect_for(settings)
    before = transcribe_requests(whisper_service_url)
    run = run_steps(settings, store, expect)
    assert transcribe_requests(whisper_service_url) - before == len(IDS)
    report = run.folders["p225"]
    assert report.lines == len(IDS) and report.errors == [] and report.new == len(IDS)
    lines = read_jsonl(store, "p225.jsonl")
    assert all(set(line) == {"id", "transcription", "token_array"} for line in lines)
    # tiny.en's greedy text on these two (0.375 measured): real speech, not a placeholder.
    assert wer([references[i] for i in IDS], [line["transcription"] for line in lines]) <= 0.5
    record = store.read_transcription(IDS[0])
    assert lines[0]["transcription"] == record.text
    assert isinstance(record, Transcription) and record.model and record.requested_language is None
    assert record.decode_fingerprint == (expect.decode_fingerprint or "")

    before = transcribe_requests(whisper_service_url)
    again = run_steps(settings, store, expect)
    resent = 0 if expect.decode_fingerprint else len(IDS)  # no fingerprint named: no model identity, no reuse
    assert transcribe_requests(whisper_service_url) - before == resent
    assert again.folders["p225"].lines == len(IDS) and read_jsonl(store, "p225.jsonl") == lines

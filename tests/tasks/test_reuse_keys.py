"""Reuse is keyed on what changes the text (issue 12 item 7): the decode fingerprint the service
names (engine, weights content hash, decode options), the requested language and the audio; tokens
on the tokeniser's settings and the audio. Exactly what changed is redone, nothing else.

Two loopback services speaking the service's contract play the two engines: both report the
model `tiny.en`, which is what made the old name-based check reuse the other engine's text.
"""

from __future__ import annotations

from tasks.records import Transcription
from tasks.storage import Store
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import expect_for, make_corpus, read_jsonl, run_steps, settings_for, write_clip

N = 4


def test_engine_language_and_audio_changes_invalidate_exactly_the_transcripts(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": N})
    results = str(tmp_path / "results")
    store = Store(results)
    with (ContractService(engine="openai-whisper", fingerprint="fp-openai") as openai,
          ContractService(engine="faster-whisper", fingerprint="fp-faster") as faster):

        def run(service: ContractService, **overrides: object):
            settings = settings_for(audio, results, service.url, **overrides)
            sent = len(service.requests)
            report = run_steps(settings, store, expect_for(settings))
            return report, len(service.requests) - sent

        first, sent = run(openai)
        assert sent == N and first.folders["p1"].lines == N
        again, sent = run(openai)  # unchanged: everything reused
        assert sent == 0 and again.stage("tokenise").reused == N and again.folders["p1"].new == 0

        switched, sent = run(faster)  # other engine, same model name: every transcript redone ...
        assert sent == N and switched.stage("transcribe").done == N
        assert switched.stage("tokenise").reused == N  # ... and no tokens
        lines = read_jsonl(store, "p1.jsonl")
        assert all(line["transcription"].startswith("faster-whisper heard") for line in lines)
        assert switched.folders["p1"].new == N and switched.folders["p1"].changed

        german, sent = run(faster, language="de")  # a language asked for: redone
        assert sent == N and german.stage("tokenise").reused == N
        record = store.read_transcription("p1/p1_000.flac")
        assert isinstance(record, Transcription) and record.requested_language == "de"
        auto, sent = run(faster)  # back to detection: redone, not the forced-German text reused
        assert sent == N and store.read_transcription("p1/p1_000.flac").requested_language is None

        write_clip(audio / "p1" / "p1_002.flac", 4242, seconds=0.6)  # one file's audio replaced
        changed, sent = run(faster)
        assert sent == 1 and faster.requests[-1] == "p1_002.flac"
        assert changed.stage("tokenise").done == 1 and changed.stage("tokenise").reused == N - 1
        assert changed.folders["p1"].new == 1 and changed.folders["p1"].lines == N


def test_a_service_that_names_no_fingerprint_makes_nothing_reusable(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2})
    with ContractService(fingerprint=None) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        for tokens_reused in (0, 2):
            run = run_steps(settings, store, expect_for(settings))
            assert run.stage("transcribe").reused == 0 and run.stage("tokenise").reused == tokens_reused
            assert run.folders["p1"].lines == 2 and run.folders["p1"].new == 2
        assert len(service.requests) == 4


def test_tokeniser_settings_invalidate_exactly_the_tokens(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2, "p2": 1})
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        run_steps(settings, store, expect_for(settings))
        other = {**expect_for(settings).tokenizer_settings, "version": 99}  # as if the tokeniser changed
        sent = len(service.requests)
        run = run_steps(settings, store, expect_for(settings, tokenizer_settings=other))
        assert len(service.requests) == sent and run.stage("transcribe").reused == 3
    # The tokeniser really produced version-1 tokens, so nothing matches what was expected.
    assert run.stage("tokenise").done == 3
    assert all("stale tokens from tokeniser settings version: 1 (this run: 99)" in e.error
               for r in run.folders.values() for e in r.errors)


def test_a_service_restarted_with_other_settings_mid_run_gives_no_mixed_lines(tmp_path):
    """Each answer's own fingerprint is stored: text decoded under settings other than those
    `/healthz` named at the start of the run is refused at merge, not mixed into the folder."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2})
    with ContractService(engine="faster-whisper", fingerprint="fp-after-restart") as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        expect = expect_for(settings).model_copy(update={"decode_fingerprint": "fp-at-start"})
        run = run_steps(settings, Store(settings.results_root), expect)
    assert run.stage("transcribe").done == 2 and run.folders["p1"].lines == 0
    assert all("stale transcription from faster-whisper tiny.en (decode fingerprint fp-after-res" in e.error
               for e in run.folders["p1"].errors)

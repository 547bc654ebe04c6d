"""The default engine on real weights and real speech: batching, silence, long clips, accuracy."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from tests.wer import normalise, wer
from whisper_service.audio import SAMPLE_RATE
from whisper_service.engines import Engine, Transcript, load_engine
from whisper_service.engines.convert import CONVERTER_VERSION
from whisper_service.engines.models import bundled_ct2_dir, weights_sha256
from whisper_service.engines.openai_whisper import OpenAIWhisperEngine, is_no_speech, resolve_device

if TYPE_CHECKING:
    from tests.whisper_service.conftest import DemoClip

MAX_DEMO_WER = 0.25
# Golden output: the default options (greedy, fallback ladder) on p225/p225_001_mic2.flac. A change
# here is a change of every transcript: bump DECODER_VERSION (decode_options.py) with it.
GOLDEN_P225_001 = "The birch can you sleep on the smooth planks?"


@pytest.fixture(scope="module")
def batched(openai_engine: OpenAIWhisperEngine, demo_clips: list[DemoClip]) -> list[Transcript]:
    """The whole demo corpus in one call: one batched encoder/decoder pass."""
    return openai_engine.transcribe([c.audio for c in demo_clips])


def test_implements_the_engine_protocol(openai_engine: OpenAIWhisperEngine):
    assert isinstance(openai_engine, Engine)
    assert (openai_engine.name, openai_engine.model_name, openai_engine.device) == (
        "openai-whisper",
        "tiny.en",
        "cpu",
    )
    assert openai_engine.fp16 is False  # fp16 only on CUDA
    assert torch.get_num_threads() <= len(os.sched_getaffinity(0))  # no oversubscription


def test_default_options_name_what_was_loaded(openai_engine: OpenAIWhisperEngine):
    options = openai_engine.options
    assert (options.engine, options.model, options.compute_type) == ("openai-whisper", "tiny.en", "float32")
    assert options.weights_sha256 == weights_sha256(bundled_ct2_dir())  # the source weights' content
    assert options.converter_version == CONVERTER_VERSION
    assert (options.beam_size, options.temperatures[0], options.has_fallback) == (1, 0.0, True)


@pytest.mark.golden
def test_golden_transcript(batched: list[Transcript]):
    first = batched[0]
    assert first.text == GOLDEN_P225_001
    assert (first.language, first.temperature, first.flags, first.language_probability) == ("en", 0.0, (), None)
    assert -1.0 < first.avg_logprob < 0 and 0 <= first.no_speech_prob < 0.6
    assert first.words_per_second == pytest.approx(9 / first.duration)
    assert [(s.start, s.text) for s in first.segments] == [(0.0, GOLDEN_P225_001)]


def test_one_transcript_per_clip_in_order(batched, demo_clips):
    assert len(batched) == len(demo_clips)
    for transcript, clip in zip(batched, demo_clips, strict=True):
        assert transcript.language == "en"
        assert transcript.duration == pytest.approx(len(clip.audio) / SAMPLE_RATE)
        assert transcript.text and transcript.text == transcript.text.strip()


@pytest.mark.golden
def test_batched_equals_one_at_a_time(openai_engine, batched, demo_clips):
    # One clip per speaker folder (one per voice): a batch-of-1 decode costs nearly as much as
    # the whole 20-clip batch on CPU (each decoder step reads the 80 MB embedding), so all 20
    # singly would dominate the suite. Other batch compositions are checked by the silence test.
    picks = [i for i, c in enumerate(demo_clips) if c.id.endswith("_001_mic2.flac")]
    assert len(picks) >= 4
    singles = [openai_engine.transcribe([demo_clips[i].audio])[0] for i in picks]
    assert [(t.text, t.flags, t.temperature) for t in singles] == [
        (batched[i].text, batched[i].flags, batched[i].temperature) for i in picks
    ]
    for single, i in zip(singles, picks, strict=True):
        assert single.avg_logprob == pytest.approx(batched[i].avg_logprob, abs=1e-3)


@pytest.mark.golden
def test_batched_beam_search_works_and_equals_one_at_a_time(openai_engine, demo_clips):
    """openai-whisper 20250625's decode() crashes on batched beam search (features not repeated
    per beam); the engine's own task repeats them. Two clips: the smallest batch that crashed."""
    beam = openai_engine.options.model_validate(openai_engine.options.model_dump() | {"beam_size": 5})
    clips = [demo_clips[1].audio, demo_clips[6].audio]
    together = openai_engine.transcribe(clips, None, beam)
    alone = [openai_engine.transcribe([c], None, beam)[0] for c in clips]
    assert [t.text for t in together] == [t.text for t in alone] and all(t.text for t in alone)


def test_forced_fallback_samples_in_batches_and_flags_what_never_passed(openai_engine, demo_clips):
    """A log-prob threshold of 0 fails every decode: each clip climbs the whole ladder (best-of-5
    sampling at 0.5, batched) and comes back flagged with its most confident attempt."""
    strict = openai_engine.options.model_validate(
        openai_engine.options.model_dump() | {"temperatures": (0.0, 0.5), "log_prob_threshold": 0.0}
    )
    out = openai_engine.transcribe([c.audio for c in demo_clips[:3]], None, strict)
    for transcript in out:
        assert transcript.text and transcript.temperature in (0.0, 0.5)
        assert transcript.flags == ("low_confidence", "fallback_exhausted")


@pytest.mark.golden
def test_prompt_is_honoured(openai_engine, demo_clips):
    prompted = openai_engine.options.for_request(prompt="The birch canoe.")
    [out] = openai_engine.transcribe([demo_clips[0].audio], None, prompted)
    assert out.text == "The birch canoe slid on the smooth planks."  # vs GOLDEN_P225_001 unprompted


def test_demo_corpus_wer(batched, demo_clips):
    score = wer([c.reference for c in demo_clips], [t.text for t in batched])
    print(f"openai-whisper tiny.en greedy WER on the demo corpus: {score:.3f}")
    assert score <= MAX_DEMO_WER, f"WER {score:.3f} > {MAX_DEMO_WER}: " + "; ".join(
        f"{c.reference!r} -> {t.text!r}" for c, t in zip(demo_clips, batched, strict=True)
    )


def test_silence_gives_empty_text_without_touching_order(openai_engine, batched, demo_clips):
    silence = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
    hum = (1e-4 * np.random.default_rng(0).standard_normal(SAMPLE_RATE)).astype(np.float32)
    empty = np.zeros(0, dtype=np.float32)
    out = openai_engine.transcribe([silence, demo_clips[0].audio, hum, empty, demo_clips[1].audio])
    assert [t.text for t in out] == ["", batched[0].text, "", "", batched[1].text]
    assert [out[i].duration for i in (0, 2, 3)] == [2.0, 1.0, 0.0]
    assert [(out[i].avg_logprob, out[i].flags) for i in (0, 2, 3)] == [(None, ())] * 3  # never decoded


def test_no_speech_rule_is_whispers():
    assert is_no_speech(0.9, -1.5)
    assert not is_no_speech(0.9, -0.3)  # confident text wins over the no-speech token
    assert not is_no_speech(0.2, -1.5)


def test_empty_batch(openai_engine):
    assert openai_engine.transcribe([]) == []


def test_clip_longer_than_30s_is_transcribed_whole(openai_engine, batched, demo_clips):
    # Best-recognised clips first, so the check is about windowing, not about hard sentences.
    ranked = sorted(range(len(demo_clips)), key=lambda i: wer([demo_clips[i].reference], [batched[i].text]))
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    order: list[int] = []
    while sum(len(demo_clips[i].audio) + len(gap) for i in order) <= 32 * SAMPLE_RATE:
        order.append(ranked[len(order) % len(ranked)])
    first, last = demo_clips[order[0]], demo_clips[order[-1]]
    long_clip = np.concatenate([part for i in order for part in (demo_clips[i].audio, gap)])

    [result] = openai_engine.transcribe([long_clip])

    assert result.duration > 30
    assert len(result.segments) > 1 and result.segments[-1].end > 30  # the engine's own timestamps
    assert [s.start for s in result.segments] == sorted(s.start for s in result.segments)
    assert result.avg_logprob is not None and result.temperature is not None
    heard = set(normalise(result.text))
    for clip in (first, last):
        words = {w for w in normalise(clip.reference) if len(w) > 3}
        assert len(words & heard) >= len(words) / 2, f"{clip.reference!r} missing from {result.text!r}"
    # Whole, not just the first window: well over one window's worth of words.
    assert len(normalise(result.text)) > 0.7 * sum(len(normalise(demo_clips[i].reference)) for i in order)


def test_cuda_on_a_cpu_machine_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"


@pytest.mark.gpu
def test_cuda_fp16_transcribes_the_demo_corpus(demo_clips, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIO_PIPELINE_CACHE_DIR", str(tmp_path))
    engine = load_engine("openai-whisper", "tiny.en", device="auto")
    try:
        assert (engine.device, engine.fp16) == ("cuda", True)
        out = engine.transcribe([c.audio for c in demo_clips])
        score = wer([c.reference for c in demo_clips], [t.text for t in out])
        print(f"openai-whisper tiny.en greedy fp16 CUDA WER on the demo corpus: {score:.3f}")
        assert score <= MAX_DEMO_WER
    finally:
        engine.close()


def test_language_the_model_cannot_do_is_refused(openai_engine: OpenAIWhisperEngine, demo_clips):
    """Same contract as faster-whisper: the service turns this into a 400, never a wrong text."""
    from whisper_service.engines.base import UnsupportedLanguageError

    with pytest.raises(UnsupportedLanguageError, match="English-only"):
        openai_engine.transcribe([demo_clips[0].audio], language="fr")
    with pytest.raises(UnsupportedLanguageError, match="unknown language"):
        openai_engine.transcribe([demo_clips[0].audio], language="klingon")
    assert openai_engine.transcribe([demo_clips[0].audio], language="EN")[0].language == "en"

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
from whisper_service.engines.openai_whisper import OpenAIWhisperEngine, is_no_speech, resolve_device

if TYPE_CHECKING:
    from tests.whisper_service.conftest import DemoClip

MAX_DEMO_WER = 0.25


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


def test_one_transcript_per_clip_in_order(batched, demo_clips):
    assert len(batched) == len(demo_clips)
    for transcript, clip in zip(batched, demo_clips, strict=True):
        assert transcript.language == "en"
        assert transcript.duration == pytest.approx(len(clip.audio) / SAMPLE_RATE)
        assert transcript.text and transcript.text == transcript.text.strip()


def test_batched_equals_one_at_a_time(openai_engine, batched, demo_clips):
    # One clip per speaker folder (one per voice): a batch-of-1 decode costs nearly as much as
    # the whole 20-clip batch on CPU (each decoder step reads the 80 MB embedding), so all 20
    # singly would dominate the suite. Other batch compositions are checked by the silence test.
    picks = [i for i, c in enumerate(demo_clips) if c.id.endswith("_001_mic2.flac")]
    assert len(picks) >= 4
    singles = [openai_engine.transcribe([demo_clips[i].audio])[0] for i in picks]
    assert singles == [batched[i] for i in picks]


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

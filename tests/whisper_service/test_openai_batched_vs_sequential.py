"""openai-whisper's batched path against its own sequential `transcribe()` (issue 12).

`transcribe()` scored better than batched `decode()` on real clips. The two differ in how a
short clip becomes the encoder's 30 s input (samples padded, or log-mel frames padded) and in
timestamp mode; bench/ow_batched_vs_sequential.py measures each difference (docs/QUALITY.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
import whisper
from whisper.audio import N_FRAMES

from whisper_service.audio import SAMPLE_RATE
from whisper_service.engines.openai_whisper import OpenAIWhisperEngine, log_mel_window

if TYPE_CHECKING:
    from tests.whisper_service.conftest import DemoClip

# One clip per demo voice: where the two paddings gave different text in the bench.
PICKS = ("p225/p225_002_mic2.flac", "p226/p226_003_mic2.flac", "p227/p227_002_mic2.flac", "p228/p228_003_mic2.flac")


@pytest.fixture(scope="module")
def picked(demo_clips: list[DemoClip]) -> list[DemoClip]:
    return [c for c in demo_clips if c.id in PICKS]


@pytest.mark.golden
def test_mel_padding_is_transcribes_input(openai_engine: OpenAIWhisperEngine, picked):
    """`log_mel_window(.., "mel")` is what transcribe() feeds the encoder: one batched greedy
    decode of it in timestamp mode gives transcribe()'s text, clip for clip."""
    model = openai_engine.model
    with torch.inference_mode():
        mels = torch.stack([log_mel_window(c.audio, model.dims.n_mels, "mel") for c in picked])
        batched = whisper.decode(model, mels, whisper.DecodingOptions(language="en", fp16=False))
        sequential = [
            model.transcribe(c.audio, language="en", temperature=0.0, fp16=False, verbose=None)["text"].strip()
            for c in picked
        ]
    assert [r.text for r in batched] == sequential


def test_the_two_paddings_differ_only_after_the_clip(picked):
    """Same frames where the clip is; after it, digital silence (about -1) against zeros."""
    clip = picked[0].audio
    audio, mel = (log_mel_window(clip, 80, p) for p in ("audio", "mel"))
    frames = len(clip) // 160
    assert audio.shape == mel.shape == (80, N_FRAMES)
    assert torch.allclose(audio[:, : frames - 2], mel[:, : frames - 2], atol=1e-5)
    assert torch.all(mel[:, frames:] == 0)
    assert float(audio[:, frames + 10 :].max()) < -0.5


def test_a_full_window_is_not_padded_either_way(picked):
    """A 30 s clip has no padding: both give the same input (bar the last frames, where the
    STFT sees reflected samples in one and zeros in the other)."""
    clip = np.resize(picked[0].audio, 30 * SAMPLE_RATE).astype(np.float32)
    audio, mel = (log_mel_window(clip, 80, p) for p in ("audio", "mel"))
    assert torch.allclose(audio[:, :-2], mel[:, :-2], atol=1e-4)

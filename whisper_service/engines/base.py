"""The one interface every Whisper engine implements.

Engines are loaded once per process and called with batches; the service's batcher gathers
concurrent requests into those batches. Batched and single calls share one signature.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from whisper_service.audio import SAMPLE_RATE

WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's receptive field; longer clips are windowed
# Below this RMS (-60 dBFS) a clip is treated as silence and never reaches the model:
# Whisper hallucinates text ("Thank you.") on silence and near-silence.
SILENCE_RMS = 1e-3
# Same rule as `whisper.transcribe`: a segment is "no speech" when the model says so AND it is
# not confident about the text it produced.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0


@dataclass(frozen=True)
class Transcript:
    """One clip's result. `text` is stripped; empty for silence."""

    text: str
    language: str
    duration: float  # seconds of input audio


class UnsupportedLanguageError(ValueError):
    """The request asked for a language the model cannot transcribe (the service answers 400)."""


class ModelNotAvailableError(LookupError):
    """A model name or path that cannot be loaded offline; the message lists what can."""


@runtime_checkable
class Engine(Protocol):
    """A loaded Whisper model. `transcribe` returns one Transcript per input, in order."""

    name: str  # "openai-whisper" | "faster-whisper"
    model_name: str  # what clients see in responses, e.g. "tiny.en"
    device: str  # "cpu" | "cuda"

    def transcribe(
        self, batch: list[np.ndarray], language: str | None = None
    ) -> list[Transcript]: ...

    def close(self) -> None: ...


def is_silent(audio: np.ndarray) -> bool:
    """True for empty or near-silent audio (RMS below SILENCE_RMS)."""
    if audio.size == 0:
        return True
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


def is_no_speech(no_speech_prob: float, avg_logprob: float) -> bool:
    """whisper.transcribe's rule: likely no speech and not confident in the decoded text."""
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD


def transcribe_by_length(
    clips: list[np.ndarray],
    language: str | None,
    short: Callable[[list[np.ndarray]], list[Transcript]],
    long: Callable[[np.ndarray], Transcript],
) -> list[Transcript]:
    """The batching rule every engine shares: silence never reaches the model (""), clips over
    one 30 s window are transcribed whole by `long`, and all the rest go to one `short` call."""
    results: list[Transcript | None] = [None] * len(clips)
    batched: list[int] = []
    for i, audio in enumerate(clips):
        if is_silent(audio):
            results[i] = Transcript("", language or "en", len(audio) / SAMPLE_RATE)
        elif len(audio) > WINDOW_SAMPLES:
            results[i] = long(audio)
        else:
            batched.append(i)
    if batched:
        for i, transcript in zip(batched, short([clips[i] for i in batched]), strict=True):
            results[i] = transcript
    return [r for r in results if r is not None]

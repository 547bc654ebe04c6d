"""The one interface every Whisper engine implements.

Engines are loaded once per process and called with batches; the service's batcher gathers
concurrent requests into those batches. Batched and single calls share one signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


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

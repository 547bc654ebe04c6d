"""Response bodies of the Whisper service (the HTTP contract the pipeline's client relies on)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

ResponseFormat = Literal["json", "text", "verbose_json"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TranscriptionResponse(_Frozen):
    """`POST /transcribe`."""

    text: str  # "" for silence
    language: str  # ISO 639-1 code, e.g. "en"
    duration: float  # seconds of audio received
    model: str  # e.g. "tiny.en"


class OpenAITranscription(_Frozen):
    """`POST /v1/audio/transcriptions` with response_format=json (OpenAI's shape)."""

    text: str


class OpenAISegment(_Frozen):
    """One segment of verbose_json; the service returns the whole clip as one segment."""

    id: int
    start: float
    end: float
    text: str


class OpenAIVerboseTranscription(_Frozen):
    """`POST /v1/audio/transcriptions` with response_format=verbose_json."""

    task: Literal["transcribe"] = "transcribe"
    language: str  # ISO 639-1 code (OpenAI itself returns the English name)
    duration: float
    text: str
    segments: list[OpenAISegment]


class HealthResponse(_Frozen):
    """`GET /healthz`: 200 with status "ok" once the model is loaded, else 503."""

    status: Literal["loading", "ok", "failed"]
    engine: str | None = None
    model: str | None = None
    device: str | None = None
    error: str | None = None  # why loading failed


class ErrorResponse(_Frozen):
    """Every 4xx/5xx body: one sentence saying what was wrong and, where useful, what to do."""

    error: str

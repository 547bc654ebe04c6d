"""Response bodies of the Whisper service (the HTTP contract the pipeline's client relies on)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from whisper_service.quality import QualityFlag

ResponseFormat = Literal["json", "text", "verbose_json", "srt", "vtt"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TranscriptionResponse(_Frozen):
    """`POST /transcribe`. The quality fields are documented in docs/QUALITY.md."""

    text: str  # "" for silence
    language: str  # ISO 639-1 code, e.g. "en"
    duration: float  # seconds of audio received
    model: str  # e.g. "tiny.en"
    engine: str  # "openai-whisper" | "faster-whisper"
    fingerprint: str  # sha256 hex of the decode options that produced this text
    language_probability: float | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None
    compression_ratio: float | None = None
    temperature: float | None = None
    words_per_second: float | None = None
    flags: list[QualityFlag] = Field(default_factory=list)


class OpenAITranscription(_Frozen):
    """`POST /v1/audio/transcriptions` with response_format=json (OpenAI's shape)."""

    text: str


class OpenAISegment(_Frozen):
    """One segment of verbose_json. A clip of up to 30 s is decoded without timestamps and is
    one segment spanning the clip; a longer clip has the engine's own timed segments."""

    id: int
    start: float
    end: float
    text: str
    avg_logprob: float | None = None  # of the clip (short clips) as OpenAI reports per segment
    compression_ratio: float | None = None
    no_speech_prob: float | None = None
    temperature: float | None = None


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
    weights_sha256: str | None = None  # content hash of the loaded weights
    decode: dict[str, Any] | None = None  # the default DecodeOptions, field by field
    fingerprint: str | None = None  # sha256 hex of the decode options' canonical JSON
    error: str | None = None  # why loading failed


class ErrorResponse(_Frozen):
    """Every 4xx/5xx body: one sentence saying what was wrong and, where useful, what to do."""

    error: str

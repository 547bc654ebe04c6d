"""Settings of the Whisper service: one object per process, from `WHISPER_*` env vars and flags.

Unsafe combinations are refused when the object is built, before anything binds a socket:
listening on a non-loopback host without `WHISPER_API_TOKEN` raises unless
`WHISPER_ALLOW_PUBLIC=true` says the open port is deliberate (e.g. behind an authenticating
proxy). An empty token is refused too, since it would make `Bearer ` a valid credential.
"""

from __future__ import annotations

import ipaddress
from typing import Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from whisper_service.audio import MAX_AUDIO_SECONDS, MAX_DECODED_SAMPLES
from whisper_service.decode_options import DEFAULT_TEMPERATURES, DecodeKnobs
from whisper_service.engines import DeviceName, EngineName

MB = 1024 * 1024


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything


class WhisperServiceSettings(BaseSettings):
    """Everything `create_app` and `serve` need. Env prefix `WHISPER_`, e.g. `WHISPER_PORT=9000`."""

    model_config = SettingsConfigDict(env_prefix="WHISPER_", extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless a token.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    engine: EngineName = Field(
        "auto",
        description="Which Whisper implementation runs; auto: faster-whisper on CPU, "
        "openai-whisper on CUDA (measured: bench/quality.py).",
    )
    model: str = Field("tiny.en", description="Model name available offline, or a local path.")
    device: DeviceName = Field("auto", description="auto: CUDA when present, else CPU.")
    max_batch_size: int | None = Field(
        None, ge=1,
        description="Most clips in one engine call; unset: 4 for faster-whisper on CPU (a 30 s "
        "encoder window costs the least per clip at batch 2-4 there, more again at 16), else 8.",
    )
    engine_workers: int | None = Field(
        None, ge=1,
        description="Engine calls run side by side (faster-whisper only), each on CPUs / workers "
        "threads; unset: 2 on a CPU with 2+ cores, else 1 (docs/PERFORMANCE.md).",
    )
    max_wait_ms: float = Field(
        10, ge=0, description="How long the first request of a batch waits for company."
    )
    max_upload_bytes: int = Field(100 * MB, ge=1, description="Largest accepted audio upload.")
    max_audio_seconds: float = Field(
        MAX_AUDIO_SECONDS, gt=0, description="Longest accepted audio once decoded (FLAC packs silence ~1000:1)."
    )
    max_decoded_samples: int = Field(
        MAX_DECODED_SAMPLES, ge=1,
        description="Most raw samples (frames x channels) decoded from one upload, checked from the header.",
    )
    max_queue: int = Field(
        64, ge=1,
        description="Clips waiting per lane (short, long) before the service answers 429 with Retry-After.",
    )
    language: str | None = Field(
        None, description="Language used when a request names none; None lets the model decide."
    )
    beam_size: int | None = Field(
        None, ge=1, le=32,
        description="Beam width at temperature 0 (1: greedy); unset: faster-whisper 5, openai-whisper 1.",
    )
    best_of: int = Field(5, ge=1, le=32, description="Samples per clip at fallback temperatures.")
    temperatures: tuple[float, ...] = Field(
        DEFAULT_TEMPERATURES,
        min_length=1,
        description="Temperature fallback ladder, e.g. WHISPER_TEMPERATURES='[0.0, 0.2]'; "
        "'[0.0]' turns the fallback off.",
    )
    compression_ratio_threshold: float | None = Field(
        2.4, gt=0, description="Re-decode a clip whose text compresses better than this (a loop)."
    )
    log_prob_threshold: float | None = Field(
        -1.0, description="Re-decode a clip whose average token log-probability is below this."
    )
    no_speech_threshold: float | None = Field(
        0.6, ge=0, le=1, description="A clip above this no-speech probability and below the "
        "log-prob threshold is silence (empty text, no fallback).",
    )
    compute_type: str = Field(
        "auto", description="auto (CPU: int8 / float32; CUDA: float16), or an explicit type."
    )
    initial_prompt: str | None = Field(None, description="Text every decode is conditioned on.")
    no_timestamps_over_s: float | None = Field(
        10.0, gt=0, le=30,
        description="faster-whisper: clips longer than this many seconds (a long recording's "
        "segments) decode without timestamp tokens, as BatchedInferencePipeline does; "
        "WHISPER_NO_TIMESTAMPS_OVER_S=30 keeps them on every clip.",
    )
    api_token: SecretStr | None = Field(
        None, description="If set, all routes but /healthz need `Authorization: Bearer <token>`."
    )
    allow_public: bool = Field(
        False, description="Permit a non-loopback host without a token (you secure it elsewhere)."
    )

    @field_validator("language")
    @classmethod
    def _normalise_language(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip().lower() or None  # "" (e.g. WHISPER_LANGUAGE=) means "detect"

    def decode_knobs(self) -> DecodeKnobs:
        """The decode settings as the engines take them (validated once more there)."""
        return DecodeKnobs(
            beam_size=self.beam_size,
            best_of=self.best_of,
            temperatures=self.temperatures,
            compression_ratio_threshold=self.compression_ratio_threshold,
            log_prob_threshold=self.log_prob_threshold,
            no_speech_threshold=self.no_speech_threshold,
            compute_type=self.compute_type,
            language=self.language,
            initial_prompt=self.initial_prompt,
            no_timestamps_over_s=self.no_timestamps_over_s,
        )

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Self:
        if self.api_token is not None and not self.api_token.get_secret_value().strip():
            raise ValueError("WHISPER_API_TOKEN is empty: unset it or give a real token")
        self.decode_knobs()  # bad decode settings fail here, before anything binds or loads
        if not is_loopback(self.host) and self.api_token is None and not self.allow_public:
            raise ValueError(
                f"refusing to serve on non-loopback host {self.host!r} without WHISPER_API_TOKEN; "
                "set a token, bind 127.0.0.1, or set WHISPER_ALLOW_PUBLIC=true if another layer "
                "authenticates"
            )
        return self

"""Decode options: everything that changes the text, as one typed frozen object with a fingerprint.

Why: the pipeline reuses a transcript only when it would come out the same again. The model's
*name* cannot say that (both engines report "tiny.en"; two directories both called `ct2` are not
one model), so the service reports this object and a hash of it on `/healthz` and with every
transcription, and clients key reuse on the hash. Anything that can change a transcript belongs
here; `DECODER_VERSION` is bumped when our own decoding code changes behaviour.

The object is hashable (frozen, tuples only), so the batcher can group requests by it: a request
that overrides the temperature or the prompt gets its own options object and its own batches.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Bump when a change to the engines' decoding code can change a transcript for the same options
# and weights (e.g. a new fallback rule), so fingerprints and therefore reuse change with it.
# 2: faster-whisper decodes short clips with timestamp tokens, as its `transcribe()` does.
# 3: faster-whisper follows `transcribe()`'s seek rule on short clips (a decode that stops early
#    goes on in a next window), and clips over `no_timestamps_over_s` decode without timestamps.
DECODER_VERSION = 3

DEFAULT_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # Whisper's own ladder

ResolvedEngine = Literal["openai-whisper", "faster-whisper"]
# Beam width when the settings name none. faster-whisper batches beam search in C++ (its own
# default is 5); openai-whisper's beam search is a Python loop per step and beam: on the demo
# corpus beam 5 took 2x the time of greedy (both with fallback) for WER 0.157 vs 0.164
# (bench/results/quality-cpu.json), so greedy; its fallback recovers more on hard clips.
ENGINE_BEAM_SIZE: dict[str, int] = {"faster-whisper": 5, "openai-whisper": 1}


class DecodeKnobs(BaseModel):
    """The user-settable part of the decode options (from `WHISPER_*` settings and `serve` flags).

    Engine and weights identity are added by the engine once it has loaded (`DecodeOptions`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    beam_size: int | None = Field(
        None,
        ge=1,
        le=32,
        description="Beam width at temperature 0 (1 = greedy); None: the engine's default "
        "(faster-whisper 5; openai-whisper 1, where beam 5 cost 2x the time for -0.007 WER).",
    )
    best_of: int = Field(5, ge=1, le=32, description="Samples per clip at temperature > 0.")
    temperatures: tuple[float, ...] = Field(
        DEFAULT_TEMPERATURES,
        min_length=1,
        description="Fallback ladder: a clip failing the thresholds is re-decoded at the next one.",
    )
    compression_ratio_threshold: float | None = Field(
        2.4, gt=0, description="gzip ratio above which a decode counts as a repetition loop."
    )
    log_prob_threshold: float | None = Field(
        -1.0, description="Average token log-probability below which a decode counts as failed."
    )
    no_speech_threshold: float | None = Field(
        0.6, ge=0, le=1, description="No-speech probability above which a low-confidence clip is silence."
    )
    compute_type: str = Field(
        "auto", description="auto, or float32/float16 (openai-whisper), or any CTranslate2 type."
    )
    no_timestamps_over_s: float | None = Field(
        10.0, gt=0, le=30,
        description="faster-whisper: clips longer than this (seconds) decode without timestamp "
        "tokens, as BatchedInferencePipeline decodes its VAD chunks; shorter ones with them, as "
        "transcribe() does. Measured (docs/PERFORMANCE.md): timestamps won on 2-5 s sentences, "
        "lost on 20-30 s segments of long recordings. None or 30: always with timestamps.",
    )
    language: str | None = Field(None, description="Language when a request names none.")
    initial_prompt: str | None = Field(None, description="Text the decoder is conditioned on.")

    @field_validator("temperatures")
    @classmethod
    def _ladder(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= t <= 2.0 for t in value):
            raise ValueError(f"temperatures must lie in [0, 2], got {value}")
        if list(value) != sorted(value):
            raise ValueError(f"temperatures must be ascending (a fallback ladder), got {value}")
        return tuple(float(t) for t in value)

    @field_validator("language", "initial_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None


class DecodeOptions(DecodeKnobs):
    """The knobs plus what was loaded: engine, model, weights content hash, resolved compute type.

    `fingerprint` is the sha256 of the canonical JSON of every field: equal fingerprints mean
    equal inputs to decoding, so equal text for the same audio.
    """

    engine: ResolvedEngine
    beam_size: int = Field(ge=1, le=32)  # resolved: never None once an engine has loaded
    model: str  # what clients see, e.g. "tiny.en"
    weights_sha256: str  # content hash of the weights files (see engines.models.weights_sha256)
    converter_version: int | None = None  # set when openai-whisper runs converted CTranslate2 weights
    decoder_version: int = DECODER_VERSION

    @classmethod
    def build(
        cls,
        knobs: DecodeKnobs,
        *,
        engine: ResolvedEngine,
        model: str,
        weights_sha256: str,
        compute_type: str,
        converter_version: int | None = None,
    ) -> DecodeOptions:
        """The engine's default options: `knobs` with the identity of what was loaded."""
        default_beam = ENGINE_BEAM_SIZE[engine]
        values = knobs.model_dump() | {
            "compute_type": compute_type,
            "beam_size": knobs.beam_size or default_beam,
        }
        return cls(
            **values,
            engine=engine,
            model=model,
            weights_sha256=weights_sha256,
            converter_version=converter_version,
        )

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace: the same options give the same bytes on any machine."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """sha256 hex of `canonical_json()`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def for_request(
        self, *, temperature: float | None = None, prompt: str | None = None
    ) -> DecodeOptions:
        """These options with a request's overrides (OpenAI's `temperature` and `prompt`).

        As in OpenAI's API, temperature 0 means "start at 0 and raise it when the thresholds
        fail", i.e. the configured ladder; a temperature above 0 is that one temperature only
        (no fallback): the caller asked for exactly that sampling temperature.
        """
        update: dict[str, object] = {}
        if temperature is not None and temperature > 0:
            update["temperatures"] = (temperature,)
        if prompt is not None and prompt.strip():
            update["initial_prompt"] = prompt.strip()
        if not update:
            return self
        # model_validate (not model_copy) so overrides are checked like settings are.
        return DecodeOptions.model_validate(self.model_dump() | update)

    @property
    def has_fallback(self) -> bool:
        return len(self.temperatures) > 1

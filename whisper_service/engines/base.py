"""The one interface every Whisper engine implements.

Engines are loaded once per process and called with batches; the service's batcher gathers
concurrent requests into those batches. Batched and single calls share one signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from whisper_service.audio import SAMPLE_RATE
from whisper_service.decode_options import DecodeOptions
from whisper_service.quality import QualityFlag, compression_ratio, flags_for, words_per_second

WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's receptive field; longer clips are windowed
# Below this RMS (-60 dBFS) a clip is treated as silence and never reaches the model:
# Whisper hallucinates text ("Thank you.") on silence and near-silence.
SILENCE_RMS = 1e-3
# Same rule as `whisper.transcribe`: a segment is "no speech" when the model says so AND it is
# not confident about the text it produced. Defaults; DecodeOptions carries the values in use.
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0


@dataclass(frozen=True)
class Segment:
    """A stretch of a clip's text with its time span in seconds from the clip's start."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """One clip's result. `text` is stripped; empty for silence.

    The quality fields (docs/QUALITY.md) are None where they do not apply: silence that never
    reached the model has no log-probability. Defaults keep old constructors working.
    """

    text: str
    language: str
    duration: float  # seconds of input audio
    language_probability: float | None = None  # only where the language was detected
    avg_logprob: float | None = None  # of the kept decode, per token (natural log)
    no_speech_prob: float | None = None
    compression_ratio: float | None = None  # of the final text
    temperature: float | None = None  # the ladder step whose decode was kept
    words_per_second: float | None = None
    flags: tuple[QualityFlag, ...] = ()
    segments: tuple[Segment, ...] = ()  # with times; one per clip for a single 30 s window


@dataclass(frozen=True)
class Attempt:
    """One decode of one clip at one temperature, before the fallback rule picks one."""

    text: str
    language: str
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    language_probability: float | None = None
    tokens: tuple[int, ...] = ()  # as decoded, timestamps included (for the seek rule)

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)


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

    options: DecodeOptions  # the defaults, as `/healthz` reports them

    def transcribe(
        self,
        batch: list[np.ndarray],
        language: str | None = None,
        options: DecodeOptions | None = None,
    ) -> list[Transcript]: ...

    def close(self) -> None: ...


def check_options(engine: Engine, options: DecodeOptions | None) -> DecodeOptions:
    """`options` or the engine's defaults; options made for other weights or another engine are
    refused, since their fingerprint would then describe text this engine did not produce.

    Raises:
        ValueError: `options` names another engine, model, weights or compute type.
    """
    if options is None:
        return engine.options
    mine = engine.options
    identity = ("engine", "model", "weights_sha256", "compute_type", "converter_version")
    if any(getattr(options, f) != getattr(mine, f) for f in identity):
        raise ValueError(
            f"decode options for {options.engine} {options.model} ({options.weights_sha256[:12]}, "
            f"{options.compute_type}) given to {mine.engine} {mine.model} "
            f"({mine.weights_sha256[:12]}, {mine.compute_type})"
        )
    return options


def is_silent(audio: np.ndarray) -> bool:
    """True for empty or near-silent audio (RMS below SILENCE_RMS)."""
    if audio.size == 0:
        return True
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


def is_no_speech(
    no_speech_prob: float,
    avg_logprob: float,
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD,
    log_prob_threshold: float | None = LOGPROB_THRESHOLD,
) -> bool:
    """whisper.transcribe's rule: likely no speech and not confident in the decoded text."""
    if no_speech_threshold is None or log_prob_threshold is None:
        return False
    return no_speech_prob > no_speech_threshold and avg_logprob < log_prob_threshold


def needs_fallback(attempt: Attempt, options: DecodeOptions) -> bool:
    """Whisper's rule (transcribe.decode_with_fallback): a loop-like or unconfident decode is
    retried at the next temperature, unless the model calls the clip silence."""
    failed = (
        options.compression_ratio_threshold is not None
        and attempt.compression_ratio > options.compression_ratio_threshold
    ) or (options.log_prob_threshold is not None and attempt.avg_logprob < options.log_prob_threshold)
    silent = is_no_speech(
        attempt.no_speech_prob, attempt.avg_logprob,
        options.no_speech_threshold, options.log_prob_threshold,
    )
    return failed and not silent


DecodeAt = Callable[[list[int], float], Sequence[Attempt]]
"""`decode(indices, temperature)`: one batched decode of those clips, one Attempt each, in order."""


def decode_with_fallback(n: int, decode: DecodeAt, options: DecodeOptions) -> list[tuple[Attempt, bool]]:
    """Whisper's temperature fallback over a batch: each step re-decodes ONLY the clips whose
    last decode failed `needs_fallback`, in one batched call, so a clean batch costs one pass.

    Returns (kept attempt, exhausted) per clip. When every temperature fails, the kept attempt is
    faster-whisper's choice: the most confident one among those under the compression-ratio
    threshold (a loop is never preferred over a non-loop), else the most confident overall.
    """
    attempts: list[list[Attempt]] = [[] for _ in range(n)]
    kept: list[tuple[Attempt, bool] | None] = [None] * n
    pending = list(range(n))
    for temperature in options.temperatures:
        if not pending:
            break
        results = decode(pending, temperature)
        retry = []
        for i, attempt in zip(pending, results, strict=True):
            attempts[i].append(attempt)
            if needs_fallback(attempt, options):
                retry.append(i)
            else:
                kept[i] = (attempt, False)
        pending = retry
    threshold = options.compression_ratio_threshold
    for i in pending:
        unlooped = [a for a in attempts[i] if threshold is None or a.compression_ratio <= threshold]
        kept[i] = (max(unlooped or attempts[i], key=lambda a: a.avg_logprob), True)
    return [k for k in kept if k is not None]


def finish(attempt: Attempt, exhausted: bool, duration: float, options: DecodeOptions) -> Transcript:
    """A kept attempt as a Transcript: Whisper's no-speech rule empties the text, the quality
    check flags what is left. `fallback_exhausted` only means something with a ladder."""
    silent = is_no_speech(
        attempt.no_speech_prob, attempt.avg_logprob,
        options.no_speech_threshold, options.log_prob_threshold,
    )
    text = "" if silent else attempt.text.strip()
    return Transcript(
        text=text,
        language=attempt.language,
        duration=duration,
        language_probability=attempt.language_probability,
        avg_logprob=attempt.avg_logprob,
        no_speech_prob=attempt.no_speech_prob,
        compression_ratio=compression_ratio(text),
        temperature=attempt.temperature,
        words_per_second=words_per_second(text, duration),
        flags=flags_for(
            text, duration,
            avg_logprob=attempt.avg_logprob,
            no_speech_prob=attempt.no_speech_prob,
            fallback_exhausted=exhausted and options.has_fallback,
            compression_ratio_threshold=options.compression_ratio_threshold,
            log_prob_threshold=options.log_prob_threshold,
            no_speech_threshold=options.no_speech_threshold,
        ),
        segments=(Segment(0.0, round(duration, 3), text),) if text else (),
    )


def silence(language: str | None, duration: float) -> Transcript:
    """A clip the RMS gate kept from the model: empty text, no model scores."""
    return Transcript(
        "", language or "en", duration, compression_ratio=0.0,
        words_per_second=0.0 if duration > 0 else None,
    )


def from_segments(
    segments: Sequence[tuple[float, float, str, float, float, float, int]],
    language: str,
    duration: float,
    options: DecodeOptions,
    language_probability: float | None = None,
) -> Transcript:
    """A long clip's Transcript from the engine's own windowed transcription.

    `segments` are (start, end, text, avg_logprob, no_speech_prob, temperature, n_tokens) as the
    engine's `transcribe()` kept them (it ran the fallback per window). The clip's avg_logprob is
    the token-weighted mean, its no_speech_prob the mean, its temperature the highest kept.
    """
    text = "".join(s[2] for s in segments).strip()
    tokens = sum(max(s[6], 1) for s in segments)
    avg_logprob = sum(s[3] * max(s[6], 1) for s in segments) / tokens if segments else None
    no_speech = sum(s[4] for s in segments) / len(segments) if segments else None
    temperature = max((s[5] for s in segments), default=None)
    threshold = options.log_prob_threshold
    exhausted = options.has_fallback and threshold is not None and any(
        s[5] >= options.temperatures[-1] and s[3] < threshold for s in segments
    )
    return Transcript(
        text=text,
        language=language,
        duration=duration,
        language_probability=language_probability,
        avg_logprob=avg_logprob,
        no_speech_prob=no_speech,
        compression_ratio=compression_ratio(text),
        temperature=temperature,
        words_per_second=words_per_second(text, duration),
        flags=flags_for(
            text, duration,
            avg_logprob=avg_logprob,
            no_speech_prob=no_speech,
            fallback_exhausted=exhausted,
            compression_ratio_threshold=options.compression_ratio_threshold,
            log_prob_threshold=options.log_prob_threshold,
            no_speech_threshold=options.no_speech_threshold,
        ),
        segments=tuple(Segment(round(s[0], 3), round(s[1], 3), s[2].strip()) for s in segments if s[2].strip()),
    )


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
            results[i] = silence(language, len(audio) / SAMPLE_RATE)
        elif len(audio) > WINDOW_SAMPLES:
            results[i] = long(audio)
        else:
            batched.append(i)
    if batched:
        for i, transcript in zip(batched, short([clips[i] for i in batched]), strict=True):
            results[i] = transcript
    return [r for r in results if r is not None]

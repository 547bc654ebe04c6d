"""Decode uploaded audio bytes into the mono 16 kHz float32 array Whisper expects.

soundfile sniffs the container from the bytes themselves (never from a file name or a
Content-Type header), so no ffmpeg is needed and a `.flac` that is really a WAV still works.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000


class AudioDecodeError(ValueError):
    """The bytes are not audio soundfile can read (empty, truncated, corrupt, unknown format)."""


def decode_audio(data: bytes, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any soundfile-readable bytes to a mono float32 array at `sample_rate`.

    Raises:
        AudioDecodeError: with a one-line reason a user can act on.
    """
    if not data:
        raise AudioDecodeError("empty upload: 0 bytes")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            source_rate = f.samplerate
            samples = f.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioDecodeError(f"not readable audio: {reason}") from e
    if samples.shape[0] == 0:
        raise AudioDecodeError("audio has no samples")
    if not np.isfinite(samples).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32)
    return resample(mono, source_rate, sample_rate)


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling (soxr); a no-op when the rates already match."""
    if source_rate == target_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return soxr.resample(audio, source_rate, target_rate).astype(np.float32, copy=False)


def duration_seconds(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    return len(audio) / sample_rate

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
MAX_AUDIO_SECONDS = 4 * 3600.0
"""Longest audio decoded by default. FLAC compresses silence ~1000:1, so a 100 MB upload could
otherwise decode to tens of GB of samples; the bound turns that into a 400, not an OOM kill."""

_BLOCK_FRAMES = 1 << 16
_UNKNOWN_LENGTH = 1 << 62  # libsndfile reports SF_COUNT_MAX frames when the header says "unknown"


class AudioDecodeError(ValueError):
    """The bytes are not audio soundfile can read (empty, truncated, corrupt, unknown format)."""


class _Stream(sf.SoundFile):
    """A SoundFile that never seeks.

    A FLAC written by a streaming encoder has total_samples=0 ("unknown") in STREAMINFO;
    libsndfile then reports SF_COUNT_MAX frames and fails every seek, and soundfile seeks after
    each read. Read as a stream, block by block until EOF, the same bytes decode fine.
    """

    def seekable(self) -> bool:
        return False


def decode_audio(
    data: bytes, sample_rate: int = SAMPLE_RATE, max_seconds: float = MAX_AUDIO_SECONDS
) -> np.ndarray:
    """Decode any soundfile-readable bytes to a mono float32 array at `sample_rate`.

    Raises:
        AudioDecodeError: with a one-line reason a user can act on.
    """
    if not data:
        raise AudioDecodeError("empty upload: 0 bytes")
    try:
        source_rate, samples = _read_all(data, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioDecodeError(f"not readable audio: {reason}") from e
    except MemoryError as e:
        raise AudioDecodeError("not readable audio: too large to decode in memory") from e
    if samples.shape[0] == 0:
        raise AudioDecodeError("audio has no samples")
    if not np.isfinite(samples).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32)
    return resample(mono, source_rate, sample_rate)


def _read_all(data: bytes, max_seconds: float) -> tuple[int, np.ndarray]:
    """(sample rate, frames x channels), refusing audio longer than `max_seconds`."""
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, frames = f.samplerate, f.frames
        if frames < _UNKNOWN_LENGTH:
            _check_length(frames, rate, max_seconds)
            return rate, f.read(dtype="float32", always_2d=True)
    blocks: list[np.ndarray] = []
    read = 0
    with _Stream(io.BytesIO(data)) as f:
        while block := len(chunk := f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)):
            blocks.append(chunk)
            read += block
            _check_length(read, rate, max_seconds, at_least=True)
        channels = f.channels
    return rate, np.concatenate(blocks) if blocks else np.empty((0, channels), np.float32)


def _check_length(frames: int, rate: int, max_seconds: float, at_least: bool = False) -> None:
    if frames > max_seconds * rate:
        length = f"at least {frames / rate:.0f}" if at_least else f"{frames / rate:.0f}"
        raise AudioDecodeError(f"audio is {length} s long; the limit is {max_seconds:.0f} s")


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling (soxr); a no-op when the rates already match."""
    if source_rate == target_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return soxr.resample(audio, source_rate, target_rate).astype(np.float32, copy=False)


def duration_seconds(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    return len(audio) / sample_rate

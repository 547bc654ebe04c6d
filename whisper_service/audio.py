"""Decode uploaded audio bytes into the mono 16 kHz float32 array Whisper expects.

soundfile sniffs the container from the bytes themselves (never from a file name or a
Content-Type header), so no ffmpeg is needed and a `.flac` that is really a WAV still works.

Decoding is bounded by what it would cost, not by the upload's size: FLAC packs silence ~1000:1,
so 91 KiB can hold 60 s of 192 kHz 8-channel audio (92 M samples, 350 MiB as float32). The
header's frames x channels are checked against `max_samples` before anything is read, and the
file is read block by block, each block downmixed to mono and resampled as it arrives, so peak
memory is the mono output plus one block, whatever the channel count or rate.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 4 * 3600.0
"""Longest audio decoded by default. FLAC compresses silence ~1000:1, so a 100 MB upload could
otherwise decode to tens of GB of samples; the bound turns that into a 400, not an OOM kill."""
MAX_DECODED_SAMPLES = int(MAX_AUDIO_SECONDS * 48_000 * 2)
"""Most raw samples (frames x channels) decoded by default: the seconds limit in 48 kHz stereo.
Bounds the decoding work of many-channel, high-rate files that the seconds limit lets through."""
MIN_SOURCE_RATE = 1_000
MAX_SOURCE_RATE = 768_000
"""Sample rates outside this range are not audio anyone records (a WAV header can say 2^31-1 Hz;
resampled to 16 kHz its samples vanish, and the service used to answer 200 with "")."""
CLIP_LEVEL = 0.999  # |x| at or above this fraction of full scale counts as clipped

_BLOCK_SAMPLES = 1 << 19  # raw samples per read (2 MiB as float32), whatever the channel count
_UNKNOWN_LENGTH = 1 << 62  # libsndfile reports SF_COUNT_MAX frames when the header says "unknown"
_GROW_SECONDS = 60  # output buffer growth step when the length is unknown


class AudioDecodeError(ValueError):
    """The bytes are not audio soundfile can read (empty, truncated, corrupt, unknown format),
    or decoding them would cost more than the limits allow."""


@dataclass(frozen=True)
class DecodeInfo:
    """What the decoder saw in the source, measured in the same pass that decoded it."""

    sample_rate: int  # of the source, before resampling
    channels: int
    frames: int  # frames actually read (not the header's claim)
    clipped_fraction: float  # raw samples (all channels) at |x| >= CLIP_LEVEL, 0..1


class _Stream(sf.SoundFile):
    """A SoundFile that never seeks.

    A FLAC written by a streaming encoder has total_samples=0 ("unknown") in STREAMINFO;
    libsndfile then reports SF_COUNT_MAX frames and fails every seek, and soundfile seeks after
    each read. Read as a stream, block by block until EOF, the same bytes decode fine.
    """

    def seekable(self) -> bool:
        return False


def decode_audio(
    data: bytes,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = MAX_AUDIO_SECONDS,
    max_samples: int = MAX_DECODED_SAMPLES,
) -> np.ndarray:
    """Decode any soundfile-readable bytes to a mono float32 array at `sample_rate`.

    Raises:
        AudioDecodeError: with a one-line reason a user can act on.
    """
    return decode_audio_with_info(data, sample_rate, max_seconds, max_samples)[0]


def decode_audio_with_info(
    data: bytes,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = MAX_AUDIO_SECONDS,
    max_samples: int = MAX_DECODED_SAMPLES,
) -> tuple[np.ndarray, DecodeInfo]:
    """`decode_audio` plus what was measured on the raw samples on the way (rate, channels,
    frames, clipping), so callers that want both never decode twice.

    Raises:
        AudioDecodeError: with a one-line reason a user can act on.
    """
    if not data:
        raise AudioDecodeError("empty upload: 0 bytes")
    try:
        return _decode(data, sample_rate, max_seconds, max_samples)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioDecodeError(f"not readable audio: {reason}") from e
    except MemoryError as e:
        raise AudioDecodeError("not readable audio: too large to decode in memory") from e


def _decode(
    data: bytes, target_rate: int, max_seconds: float, max_samples: int
) -> tuple[np.ndarray, DecodeInfo]:
    with sf.SoundFile(io.BytesIO(data)) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioDecodeError(
            f"sample rate {rate} Hz is outside {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz"
        )
    known = frames < _UNKNOWN_LENGTH
    if known:  # refuse from the header, before a single sample is decoded
        _check_limits(frames, rate, channels, max_seconds, max_samples)
    block_frames = max(1, _BLOCK_SAMPLES // channels)
    out = _Output(
        int(frames * target_rate / rate) + 16 if known else _GROW_SECONDS * target_rate
    )
    resampler = (
        None if rate == target_rate else soxr.ResampleStream(rate, target_rate, 1, "float32")
    )
    block = np.empty((block_frames, channels), np.float32)
    read = clipped = 0
    with (sf.SoundFile if known else _Stream)(io.BytesIO(data)) as f:
        while n := len(chunk := f.read(block_frames, dtype="float32", always_2d=True, out=block)):
            read += n
            _check_limits(read, rate, channels, max_seconds, max_samples, at_least=not known)
            if not np.isfinite(chunk).all():
                raise AudioDecodeError("audio contains NaN or infinite samples")
            clipped += int(np.count_nonzero(np.abs(chunk) >= CLIP_LEVEL))
            mono = chunk[:, 0] if channels == 1 else chunk.mean(axis=1, dtype=np.float32)
            out.append(mono if resampler is None else resampler.resample_chunk(mono))
    if read == 0:
        raise AudioDecodeError("audio has no samples")
    if resampler is not None:
        out.append(resampler.resample_chunk(np.empty(0, np.float32), last=True))
    audio = out.result()
    if audio.size == 0:
        raise AudioDecodeError(
            f"audio has no samples at {target_rate} Hz ({read} frames at {rate} Hz)"
        )
    info = DecodeInfo(rate, channels, read, clipped / (read * channels))
    return audio, info


def _check_limits(
    frames: int, rate: int, channels: int, max_seconds: float, max_samples: int,
    at_least: bool = False,
) -> None:
    prefix = "at least " if at_least else ""
    if frames > max_seconds * rate:
        raise AudioDecodeError(
            f"audio is {prefix}{frames / rate:.0f} s long; the limit is {max_seconds:.0f} s"
        )
    if frames * channels > max_samples:
        raise AudioDecodeError(
            f"audio has {prefix}{frames * channels} samples ({frames} frames x {channels} "
            f"channels at {rate} Hz); the limit is {max_samples} samples"
        )


class _Output:
    """A growable float32 buffer: one allocation when the length is known, doubling otherwise."""

    def __init__(self, capacity: int) -> None:
        self._buffer = np.empty(max(capacity, 1), np.float32)
        self._size = 0

    def append(self, samples: np.ndarray) -> None:
        end = self._size + len(samples)
        if end > len(self._buffer):
            grown = np.empty(max(end, 2 * len(self._buffer)), np.float32)
            grown[: self._size] = self._buffer[: self._size]
            self._buffer = grown
        self._buffer[self._size : end] = samples
        self._size = end

    def result(self) -> np.ndarray:
        # Shrink in place (realloc, no copy): a view would pin the slack, a copy doubles the peak.
        self._buffer.resize(self._size, refcheck=False)
        return self._buffer


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """High-quality resampling (soxr); a no-op when the rates already match."""
    if source_rate == target_rate:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return soxr.resample(audio, source_rate, target_rate).astype(np.float32, copy=False)


def duration_seconds(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    return len(audio) / sample_rate

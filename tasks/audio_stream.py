"""Long audio read in blocks: mono 16 kHz without ever holding the whole file (issue 22).

`whisper_service.audio.decode_audio` decodes a whole upload into one array, which is right for
clips and wrong for a 2-hour recording (2 h x 16 kHz x 4 B = 460 MB mono, 2.5 GB as 44.1 kHz
stereo float32). Here a file is read block by block: each block is downmixed and fed to a soxr
stream resampler, and the caller sees 16 kHz blocks. A segment's span is read by seeking to its
first frame, so a worker holds one segment (at most 30 s) at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import soundfile as sf
import soxr

from whisper_service.audio import CLIP_LEVEL, MAX_SOURCE_RATE, MIN_SOURCE_RATE, SAMPLE_RATE, AudioDecodeError

BLOCK_FRAMES = 1 << 18  # source frames per read: ~6 s at 44.1 kHz, 2 MiB as float32 stereo
_UNKNOWN_LENGTH = 1 << 62  # libsndfile's SF_COUNT_MAX: the header does not say how long


@dataclass(frozen=True)
class StreamInfo:
    """What the header says: enough to plan (duration) without decoding a sample."""

    sample_rate: int
    channels: int
    frames: int  # 0 when the header does not know (a streamed FLAC)

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


@contextmanager
def open_source(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """The source as a seekable binary file (local or any fsspec URL), read lazily."""
    with fsspec.open(path, "rb", **(storage_options or {})) as f:
        yield f


def probe(path: str, storage_options: dict[str, Any] | None = None) -> StreamInfo:
    """Rate, channels and length from the header only (a few KB read, even on object stores).

    Raises:
        AudioDecodeError: not audio soundfile can read, or an impossible sample rate.
    """
    # A small block size: on object stores each read is a ranged GET, and the header is a few KB.
    with open_source(path, {"block_size": 1 << 16, **(storage_options or {})}) as f:
        try:
            with sf.SoundFile(f) as s:
                info = StreamInfo(s.samplerate, s.channels, s.frames if s.frames < _UNKNOWN_LENGTH else 0)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioDecodeError(f"not readable audio: {getattr(e, 'error_string', None) or e}") from e
    _check_rate(info.sample_rate)
    return info


def iter_blocks(f: IO[bytes], rate: int = SAMPLE_RATE, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `rate`, in order, from an open source file.

    Raises:
        AudioDecodeError: unreadable, truncated mid-way, NaN samples, impossible rate.
    """
    try:
        with sf.SoundFile(f) as s:
            _check_rate(s.samplerate)
            resampler = None if s.samplerate == rate else soxr.ResampleStream(s.samplerate, rate, 1, "float32")
            block = np.empty((block_frames, s.channels), np.float32)
            read = 0
            while n := len(chunk := s.read(block_frames, dtype="float32", always_2d=True, out=block)):
                read += n
                mono = _mono(chunk)
                out = mono.copy() if resampler is None else resampler.resample_chunk(mono)
                if out.size:
                    yield out
            if read == 0:
                raise AudioDecodeError("audio has no samples")
            if resampler is not None:
                tail = resampler.resample_chunk(np.empty(0, np.float32), last=True)
                if tail.size:
                    yield tail
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"not readable audio: {getattr(e, 'error_string', None) or e}") from e


def read_span(f: IO[bytes], start: float, end: float, rate: int = SAMPLE_RATE) -> tuple[np.ndarray, int, int, float]:
    """The samples of [start, end) seconds, mono at `rate`; plus the source's rate, channels and
    clipped fraction (raw samples of every channel at |x| >= CLIP_LEVEL).

    Seeks to the first frame (FLAC seeks by its seek table / frame search), so the cost is the
    span, not the file before it.

    Raises:
        AudioDecodeError: unreadable, or the span lies outside the audio.
    """
    f.seek(0)  # the same open file may serve several spans
    try:
        with sf.SoundFile(f) as s:
            _check_rate(s.samplerate)
            first = int(round(start * s.samplerate))
            count = max(0, int(round(end * s.samplerate)) - first)
            s.seek(first)
            raw = s.read(count, dtype="float32", always_2d=True)
            source_rate, channels = s.samplerate, s.channels
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"not readable audio: {getattr(e, 'error_string', None) or e}") from e
    if len(raw) == 0:
        raise AudioDecodeError(f"no samples in {start:.3f}-{end:.3f} s")
    if not np.isfinite(raw).all():
        raise AudioDecodeError("audio contains NaN or infinite samples")
    clipped = float(np.count_nonzero(np.abs(raw) >= CLIP_LEVEL)) / raw.size
    mono = _mono(raw)
    if source_rate != rate:
        mono = soxr.resample(mono, source_rate, rate).astype(np.float32, copy=False)
    return np.ascontiguousarray(mono), source_rate, channels, clipped


def span_flac(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A mono span as FLAC bytes (16-bit), the upload for one segment: ~0.5x the WAV size."""
    import io

    buffer = io.BytesIO()
    sf.write(buffer, np.clip(audio, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _mono(chunk: np.ndarray) -> np.ndarray:
    return chunk[:, 0] if chunk.shape[1] == 1 else chunk.mean(axis=1, dtype=np.float32)


def _check_rate(rate: int) -> None:
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise AudioDecodeError(f"sample rate {rate} Hz is outside {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz")


def span_file(path: str, start: float, end: float, storage_options: dict[str, Any] | None = None) -> tuple[bytes, float]:
    """[start, end) seconds of the source as a FLAC file of its own: source rate and channels,
    16-bit (what an export embeds for a segment). Returns the bytes and their duration.

    Raises:
        AudioDecodeError: unreadable, or the span lies outside the audio.
        OSError: the source cannot be read.
    """
    import io

    with open_source(path, storage_options) as f:
        try:
            with sf.SoundFile(f) as s:
                _check_rate(s.samplerate)
                first = int(round(start * s.samplerate))
                s.seek(first)
                raw = s.read(max(0, int(round(end * s.samplerate)) - first), dtype="float32", always_2d=True)
                rate = s.samplerate
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AudioDecodeError(f"not readable audio: {getattr(e, 'error_string', None) or e}") from e
    if len(raw) == 0:
        raise AudioDecodeError(f"no samples in {start:.3f}-{end:.3f} s")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(raw, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), len(raw) / rate

"""Audio quality measured where a clip is decoded for tokenising, so it costs no second decode.

`decode_for_tokens` is the tokenise stage's one call: the mono array at the tokeniser's rate plus
an `AudioQuality` record (original rate and channels, level, clipping, silence, an SNR estimate).
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from tasks.records import AudioQuality
from whisper_service.audio import decode_audio

FLOOR_DBFS = -120.0
SILENCE_DBFS = -60.0
FRAME_SECONDS = 0.02
CLIP_LEVEL = 0.999


def decode_for_tokens(data: bytes, sample_rate: int) -> tuple[np.ndarray, AudioQuality]:
    """Decode `data` to mono float32 at `sample_rate` and measure it.

    Raises:
        AudioDecodeError: as `whisper_service.audio.decode_audio`.
    """
    audio = decode_audio(data, sample_rate)
    info = sf.info(io.BytesIO(data))  # header only: the original rate and channel count
    return audio, measure(audio, sample_rate, info.samplerate, info.channels)


def measure(audio: np.ndarray, sample_rate: int, source_rate: int, channels: int) -> AudioQuality:
    """Level, clipping, silence and SNR of a mono clip (the clip as the tokeniser sees it)."""
    x = audio.astype(np.float64, copy=False)
    return AudioQuality(
        sample_rate=int(source_rate), channels=int(channels), rms_dbfs=_dbfs(x),
        clipped_fraction=float(np.mean(np.abs(x) >= CLIP_LEVEL)) if x.size else 0.0,
        silence_fraction=_silence_fraction(x, sample_rate), snr_db=_snr_db(x, sample_rate),
    )


def _dbfs(x: np.ndarray) -> float:
    if x.size == 0:
        return FLOOR_DBFS
    rms = float(np.sqrt(np.mean(np.square(x))))
    return max(FLOOR_DBFS, 20 * np.log10(rms)) if rms > 0 else FLOOR_DBFS


def _frame_levels(x: np.ndarray, sample_rate: int) -> np.ndarray:
    n = max(1, int(FRAME_SECONDS * sample_rate))
    frames = x[: len(x) // n * n].reshape(-1, n)
    if frames.size == 0:
        return np.empty(0)
    rms = np.sqrt(np.mean(np.square(frames), axis=1))
    return 20 * np.log10(np.maximum(rms, 10 ** (FLOOR_DBFS / 20)))


def _silence_fraction(x: np.ndarray, sample_rate: int) -> float:
    levels = _frame_levels(x, sample_rate)
    return float(np.mean(levels < SILENCE_DBFS)) if levels.size else 1.0


def _snr_db(x: np.ndarray, sample_rate: int) -> float | None:
    """Energy-percentile SNR: loud frames (90th pct) over quiet frames (10th pct). None on silence."""
    levels = _frame_levels(x, sample_rate)
    if levels.size < 2 or levels.max() < SILENCE_DBFS:
        return None
    return float(np.percentile(levels, 90) - np.percentile(levels, 10))

"""Audio quality measured where a clip is decoded for tokenising, so it costs no second decode.

`decode_for_tokens` is the tokenise stage's one call: the mono array at the tokeniser's rate plus
an `AudioQuality` record. The source's rate, channels and clipping come from the decoder's own
block loop (`decode_audio_with_info`), measured on the raw samples of every channel before any
downmix or resampling could hide them; level, silence and SNR are measured on the mono array.
Fields, units and ranges: docs/QUALITY.md, "Audio fields".
"""

from __future__ import annotations

import numpy as np

from tasks.records import AudioQuality
from whisper_service.audio import decode_audio_with_info

FLOOR_DBFS = -120.0
SILENCE_DBFS = -60.0  # the service's silence rule too (engines.base.SILENCE_RMS = 1e-3)
FRAME_SECONDS = 0.02

# --- WADA-SNR: C. Kim and R. M. Stern, "Robust signal-to-noise ratio estimation based on
# waveform amplitude distribution analysis", Interspeech 2008, pp. 2598-2601.
# Model: clean speech amplitudes follow a gamma distribution of shape 0.4 (sign symmetric), noise
# is Gaussian. The statistic G = log E|z| - E log|z| of the noisy waveform z grows monotonically
# with the SNR; the estimate inverts the G(SNR) curve. The curve below was derived here from that
# model (`derive_wada_table`: 2^20 samples, seed 0, common random numbers across SNRs, made
# non-decreasing where sampling noise leaves it flat below 0 dB); it agrees with the authors'
# published table to within 0.002 at 0, 10, 20 and 40 dB. tests/tasks/test_audio_quality.py
# re-derives it and compares.
WADA_ALPHA = 0.4
WADA_DB = np.arange(-20, 101, dtype=np.float64)  # -20..100 dB in 1 dB steps
WADA_G = np.array([
    0.4098, 0.4099, 0.4102, 0.4102, 0.4102, 0.4105, 0.4110, 0.4110, 0.4111, 0.4115,
    0.4126, 0.4136, 0.4150, 0.4170, 0.4200, 0.4235, 0.4283, 0.4345, 0.4421, 0.4517,
    0.4622, 0.4748, 0.4893, 0.5062, 0.5247, 0.5450, 0.5665, 0.5901, 0.6149, 0.6412,
    0.6685, 0.6962, 0.7254, 0.7547, 0.7843, 0.8139, 0.8431, 0.8719, 0.9012, 0.9291,
    0.9572, 0.9848, 1.0113, 1.0375, 1.0627, 1.0867, 1.1100, 1.1325, 1.1544, 1.1752,
    1.1954, 1.2148, 1.2336, 1.2513, 1.2686, 1.2852, 1.3012, 1.3167, 1.3313, 1.3452,
    1.3586, 1.3713, 1.3833, 1.3949, 1.4059, 1.4167, 1.4269, 1.4367, 1.4459, 1.4549,
    1.4635, 1.4717, 1.4797, 1.4872, 1.4944, 1.5012, 1.5076, 1.5140, 1.5201, 1.5257,
    1.5309, 1.5359, 1.5409, 1.5456, 1.5500, 1.5541, 1.5585, 1.5624, 1.5660, 1.5697,
    1.5733, 1.5765, 1.5795, 1.5824, 1.5852, 1.5879, 1.5903, 1.5928, 1.5951, 1.5971,
    1.5994, 1.6014, 1.6033, 1.6052, 1.6070, 1.6088, 1.6103, 1.6118, 1.6132, 1.6146,
    1.6160, 1.6173, 1.6186, 1.6198, 1.6209, 1.6220, 1.6231, 1.6240, 1.6250, 1.6259,
    1.6267,
])
_WADA_EPS = 1e-10  # |z| floor before the log, relative to full scale of the normalised clip


def decode_for_tokens(data: bytes, sample_rate: int) -> tuple[np.ndarray, AudioQuality]:
    """Decode `data` to mono float32 at `sample_rate` and measure it, in one decode.

    Raises:
        AudioDecodeError: as `whisper_service.audio.decode_audio`.
    """
    audio, info = decode_audio_with_info(data, sample_rate)
    return audio, measure(audio, sample_rate, info.sample_rate, info.channels, info.clipped_fraction)


def measure(
    audio: np.ndarray, sample_rate: int, source_rate: int, channels: int, clipped_fraction: float
) -> AudioQuality:
    """Level, silence and SNR of a mono clip (the clip as the tokeniser sees it); the source's
    rate, channels and clipped fraction as the decoder measured them on the raw samples."""
    x = audio.astype(np.float64, copy=False)
    level = _dbfs(x)
    return AudioQuality(
        sample_rate=int(source_rate), channels=int(channels), rms_dbfs=level,
        clipped_fraction=float(clipped_fraction),
        silence_fraction=_silence_fraction(x, sample_rate),
        snr_db=None if level < SILENCE_DBFS else wada_snr(x),
    )


def wada_snr(x: np.ndarray) -> float | None:
    """WADA-SNR estimate in dB, clamped to the table's -20..100 dB; None for digital silence.

    Reliable roughly between 0 and 30 dB (the paper's range); below 0 dB the curve is flat and the
    estimate saturates near 0 dB or -20 dB.
    """
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return None
    z = np.maximum(np.abs(x) / peak, _WADA_EPS)
    g = float(np.log(np.mean(z)) - np.mean(np.log(z)))
    # strictly increasing for np.interp where the table is flat (below 0 dB)
    curve = WADA_G + np.arange(WADA_G.size) * 1e-9
    return float(np.interp(g, curve, WADA_DB))


def derive_wada_table(samples: int = 1 << 20, seed: int = 0) -> np.ndarray:
    """G(SNR) for the paper's model: gamma(0.4) speech amplitudes plus unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    speech = rng.gamma(WADA_ALPHA, 1.0, samples) * rng.choice([-1.0, 1.0], samples)
    noise = rng.standard_normal(samples)
    power = WADA_ALPHA * (WADA_ALPHA + 1)  # E[speech^2] of a unit-scale gamma
    curve = []
    for db in WADA_DB:
        z = np.abs(np.sqrt(10 ** (db / 10) / power) * speech + noise)
        curve.append(np.log(np.mean(z)) - np.mean(np.log(z)))
    return np.maximum.accumulate(np.array(curve))


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

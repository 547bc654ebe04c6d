"""Decoding is bounded by samples, not seconds: many-channel high-rate bombs, absurd rates.

The memory test measures this process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) around one decode, so a transient 350 MiB array cannot slip between samples.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf
import soxr

import whisper_service.audio as audio_module
from tests.reliability.corpus import GOOD, absurd_rate_wav, channel_bomb_flac, demo_audio
from tests.whisper_service.conftest import MakeService, service_settings, wait_ready
from whisper_service.audio import (
    AudioDecodeError,
    decode_audio,
    decode_audio_with_info,
    resample,
)

MIB = 1024 * 1024


bomb_flac = channel_bomb_flac
wav_with_rate = absurd_rate_wav


def peak_rss_during(fn) -> tuple[object, float]:
    """(fn(), how far this process's peak RSS rose above its RSS before the call, in MiB)."""
    status = Path("/proc/self/status")
    clear = Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    before = psutil.Process().memory_info().rss
    clear.write_text("5")  # resets VmHWM to the current RSS
    result = fn()
    hwm_kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return result, (hwm_kib * 1024 - before) / MIB


def test_many_channel_high_rate_bomb_decodes_in_bounded_memory():
    """Regression (#13): a 91 KiB FLAC of 60 s 192 kHz 8-channel silence raised memory by 440 MiB:
    the whole 92 M-sample float32 array was read before downmixing and resampling."""
    bomb = bomb_flac()
    assert len(bomb) < 120 * 1024
    audio, rise_mib = peak_rss_during(lambda: decode_audio_with_info(bomb))
    mono, info = audio
    assert (info.sample_rate, info.channels, info.frames) == (192_000, 8, 60 * 192_000)
    assert len(mono) == 60 * 16_000 and not mono.any()
    # mono 16 kHz output (3.7 MiB) + one block + soxr state; the old path needed ~440 MiB
    assert rise_mib < 48, f"peak RSS rose {rise_mib:.0f} MiB"


def test_frames_times_channels_is_bounded_before_decoding():
    bomb = bomb_flac(seconds=10, channels=8)
    with pytest.raises(AudioDecodeError, match=r"15360000 samples \(1920000 frames x 8 channels at 192000 Hz\); "
                                               r"the limit is 10000000 samples"):
        decode_audio(bomb, max_samples=10_000_000)
    assert len(decode_audio(bomb, max_samples=16_000_000)) == 10 * 16_000


def test_sample_bound_holds_when_the_header_does_not_say_the_length():
    data = bytearray(bomb_flac(seconds=10, channels=8))
    data[8 + 13] &= 0xF0  # STREAMINFO total_samples = 0: "unknown"
    data[8 + 14 : 8 + 18] = bytes(4)
    with pytest.raises(AudioDecodeError, match="at least [0-9]+ samples .* the limit is 5000000 samples"):
        decode_audio(bytes(data), max_samples=5_000_000)


@pytest.mark.parametrize("rate", [2**31 - 1, 4_000_000, 100])
def test_absurd_sample_rates_are_decode_errors(rate):
    """Regression (#13): a WAV header saying 2^31-1 Hz decoded to 0 samples: a 200 with ""."""
    with pytest.raises(AudioDecodeError, match=f"sample rate {rate} Hz is outside"):
        decode_audio(wav_with_rate(rate))


def test_zero_sample_rate_is_a_decode_error():
    with pytest.raises(AudioDecodeError, match="not readable audio"):
        decode_audio(wav_with_rate(0))


def test_a_decode_that_resamples_to_nothing_is_an_error():
    """2 frames at 48 kHz resample to no sample at 16 kHz: an empty decode, not an empty clip."""
    buffer = io.BytesIO()
    sf.write(buffer, np.full(1, 0.1, np.float32), 48_000, format="WAV", subtype="PCM_16")
    with pytest.raises(AudioDecodeError, match="no samples at 16000 Hz"):
        decode_audio(buffer.getvalue())


@pytest.mark.parametrize("block_samples", [4_099, None], ids=["small-blocks", "real-blocks"])
def test_block_decoding_equals_whole_file_decoding(monkeypatch, block_samples):
    """Downmix and resampling block by block give the same samples as the whole-array path.

    The clip must span several blocks, or no block boundary is crossed: 4,099 raw samples (2,049
    stereo frames, not a multiple of anything soxr uses) gives ~190 blocks; the real block size
    (2^19 samples, 262,144 stereo frames) is crossed by a 9 s clip at 44.1 kHz (396,900 frames)."""
    if block_samples is not None:
        monkeypatch.setattr(audio_module, "_BLOCK_SAMPLES", block_samples)
    block_frames = audio_module._BLOCK_SAMPLES // 2
    clip = soxr.resample(np.concatenate([demo_audio(3), demo_audio(1), demo_audio(2)]), 16_000, 44_100)
    clip = clip[: 9 * 44_100].astype(np.float32)
    assert len(clip) == 9 * 44_100 and len(clip) > 1.5 * block_frames  # boundaries really crossed
    stereo = np.stack([clip, 0.5 * clip], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 44_100, format="FLAC", subtype="PCM_24")
    samples, _ = sf.read(io.BytesIO(buffer.getvalue()), dtype="float32", always_2d=True)
    whole = resample(samples.mean(axis=1, dtype=np.float32), 44_100, 16_000)
    blocks, info = decode_audio_with_info(buffer.getvalue())
    assert info.frames == len(samples)
    assert len(blocks) == len(whole)
    np.testing.assert_array_equal(blocks, whole)
    known = decode_audio(GOOD[0].read_bytes())  # 16 kHz mono: no resampling, no downmix
    np.testing.assert_array_equal(known, sf.read(GOOD[0], dtype="float32")[0])


def test_info_reports_source_rate_channels_and_clipping_on_raw_samples():
    """Left at +1, right at -1: the mono mix is silent, but every raw sample is clipped."""
    n = 44_100
    stereo = np.stack([np.ones(n, np.float32), -np.ones(n, np.float32)], axis=1)
    stereo[: n // 2] *= 0.5  # first half not clipped
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 44_100, format="WAV", subtype="FLOAT")
    mono, info = decode_audio_with_info(buffer.getvalue())
    assert (info.sample_rate, info.channels, info.frames) == (44_100, 2, n)
    assert info.clipped_fraction == pytest.approx(0.5, abs=1e-4)
    assert np.abs(mono).max() < 1e-3


# --- through the service: real uvicorn on 127.0.0.1, real engine ---


@pytest.fixture(scope="module")
def bounded_service(make_service: MakeService) -> str:
    url = make_service(service_settings(max_decoded_samples=20_000_000))
    wait_ready(url)
    return url


def test_service_answers_400_for_an_absurd_rate_and_a_sample_bomb(bounded_service):
    for name, data, reason in [
        ("rate.wav", wav_with_rate(2**31 - 1), "sample rate 2147483647 Hz is outside"),
        ("bomb.flac", bomb_flac(), "the limit is 20000000 samples"),
    ]:
        response = httpx.post(f"{bounded_service}/transcribe", files={"file": (name, data)}, timeout=60)
        assert response.status_code == 400, response.text
        assert reason in response.json()["error"]
    metrics = httpx.get(f"{bounded_service}/metrics", timeout=10).text
    assert 'whisper_errors_total{reason="not_audio"} 2.0' in metrics

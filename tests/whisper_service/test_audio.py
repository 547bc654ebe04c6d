"""decode_audio on the FLACs real encoders write, and on the ones an attacker would."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from tests.reliability.corpus import GOOD, header_only_flac, unknown_length_flac
from whisper_service.audio import AudioDecodeError, decode_audio


def flac(audio: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="FLAC")
    return buffer.getvalue()


def test_flac_of_unknown_length_decodes_to_the_same_samples():
    """Streaming encoders leave total_samples=0; libsndfile then cannot seek, soundfile seeks."""
    known = decode_audio(GOOD[0].read_bytes())
    streamed = decode_audio(unknown_length_flac())
    assert len(known) > 16_000 and np.array_equal(streamed, known)


def test_flac_of_unknown_length_without_frames_has_no_samples():
    with pytest.raises(AudioDecodeError, match="no samples"):
        decode_audio(header_only_flac())


def test_silence_bomb_is_refused_before_it_is_decoded():
    """Ten minutes of silence is ~30 kB of FLAC: the length limit, not the upload limit, stops it."""
    bomb = flac(np.zeros(16_000 * 600, np.float32))
    assert len(bomb) < 100_000
    with pytest.raises(AudioDecodeError, match="600 s long; the limit is 60 s"):
        decode_audio(bomb, max_seconds=60)
    assert len(decode_audio(bomb, max_seconds=600)) == 16_000 * 600


def test_length_limit_holds_when_the_header_does_not_say_the_length():
    header_says_unknown = bytearray(flac(np.zeros(16_000 * 120, np.float32)))
    header_says_unknown[8 + 13] &= 0xF0
    header_says_unknown[8 + 14 : 8 + 18] = bytes(4)
    with pytest.raises(AudioDecodeError, match="at least 6[0-9] s long; the limit is 60 s"):
        decode_audio(bytes(header_says_unknown), max_seconds=60)

"""A corpus of bad and odd inputs, generated from the demo clips with numpy and soundfile.

`build_bad_corpus(root)` writes it and returns what each file must become: a JSONL line
("line") or error lines whose stages are named ({"decode"}, {"discover"}, ...).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

DEMO_AUDIO = Path(__file__).parents[2] / "flows" / "demo_data" / "audio"
GOOD = sorted(DEMO_AUDIO.rglob("*.flac"))


def demo_audio(i: int) -> np.ndarray:
    audio, rate = sf.read(GOOD[i], dtype="float32")
    assert rate == 16_000
    return audio


def encode(audio: np.ndarray, rate: int = 16_000, fmt: str = "FLAC", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def header_only_flac() -> bytes:
    """A FLAC with a valid STREAMINFO, total_samples=0 ("unknown") and no frames.

    libsndfile writes nothing at all for zero frames, so this is the zero-sample FLAC a streaming
    encoder (e.g. `ffmpeg ... -f flac pipe:`) leaves behind when it is stopped before any audio.
    """
    good = GOOD[0].read_bytes()
    assert good[:4] == b"fLaC" and good[4] & 0x7F == 0  # first block is STREAMINFO
    info = bytearray(good[8 : 8 + 34])
    info[13] &= 0xF0  # total samples: the low 4 bits of byte 13 ...
    info[14:18] = bytes(4)  # ... and bytes 14-17
    info[18:34] = bytes(16)  # MD5 of no audio: unknown
    return b"fLaC" + bytes([0x80]) + (34).to_bytes(3, "big") + bytes(info)


def unknown_length_flac() -> bytes:
    """A good clip whose STREAMINFO says total_samples=0 ("unknown"), frames intact.

    What `ffmpeg ... -f flac pipe:` and other streaming encoders write: they cannot seek back to
    fill in the length. libsndfile reports SF_COUNT_MAX frames and cannot seek in it.
    """
    good = bytearray(GOOD[0].read_bytes())
    good[8 + 13] &= 0xF0
    good[8 + 14 : 8 + 18] = bytes(4)
    return bytes(good)


def absurd_rate_wav(rate: int = 2**31 - 1) -> bytes:
    """One second of a demo clip as a 16-bit WAV whose header claims `rate` Hz.

    Before #13 the service resampled it to 0 samples and answered 200 with "" (and tokens []).
    """
    data = bytearray(encode(demo_audio(0)[:16_000], fmt="WAV", subtype="PCM_16"))
    assert data[12:16] == b"fmt " and int.from_bytes(data[24:28], "little") == 16_000
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * 2 & 0xFFFFFFFF).to_bytes(4, "little")  # byte rate, as a writer sets it
    return bytes(data)


def channel_bomb_flac(seconds: int = 60, rate: int = 192_000, channels: int = 8) -> bytes:
    """`seconds` of `channels`-channel silence at `rate` (~91 KiB for the defaults), written block
    by block. Decoded whole it is 92 M float32 samples: 350 MiB from a 91 KiB upload."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((rate, channels), np.float32)
        for _ in range(seconds):
            f.write(block)
    return buffer.getvalue()


# id -> "line" or the set of stages its error lines must name
Expected = dict[str, "str | set[str]"]


def build_bad_corpus(root: Path) -> Expected:
    expected: Expected = {}

    def put(file_id: str, data: bytes, outcome: str | set[str]) -> None:
        path = root / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expected[file_id] = outcome

    # Untouched good files: their lines must not change because bad files sit beside them.
    for i in (0, 6):
        put(f"good/{GOOD[i].name}", GOOD[i].read_bytes(), "line")

    rng = np.random.default_rng(7)
    clip = demo_audio(1)
    put("bad/empty.flac", b"", {"decode"})
    put("bad/zero_samples.flac", header_only_flac(), {"decode", "transcribe"})
    put("bad/truncated.flac", GOOD[2].read_bytes()[: GOOD[2].stat().st_size // 2], {"decode"})
    put("bad/random_bytes.flac", rng.bytes(8192), {"decode"})
    put("bad/absurd_rate_2e31hz.flac", absurd_rate_wav(), {"decode"})  # a WAV, named .flac
    put("odd/streamed_unknown_length.flac", unknown_length_flac(), "line")
    put("odd/wav_named.flac", encode(clip, fmt="WAV", subtype="PCM_16"), "line")
    put("odd/short_0.1s.flac", encode(clip[:1_600]), "line")
    put("odd/silence.flac", encode(np.zeros(2 * 16_000, np.float32)), "line")
    stereo = soxr.resample(demo_audio(3), 16_000, 48_000)
    put("odd/stereo_48k.flac", encode(np.stack([stereo, 0.5 * stereo], axis=1), 48_000), "line")
    put("odd/pcm24.flac", encode(demo_audio(4), subtype="PCM_24"), "line")
    pieces, seconds = [], 0.0
    for i in range(len(GOOD)):  # ~60 s: the demo clips back to back
        pieces.append(demo_audio(i))
        seconds += len(pieces[-1]) / 16_000
        if seconds >= 60:
            break
    put("long/sixty_seconds.flac", encode(np.concatenate(pieces)), "line")
    put("spaced name/ünï cödé ✓ 001.flac", GOOD[8].read_bytes(), "line")
    put("nested/deeper/still/n.flac", GOOD[9].read_bytes(), "line")

    # Links: a symlinked clip is processed, a broken one is reported, a loop is not followed.
    (root / "links").mkdir()
    os.symlink(root / "good" / GOOD[0].name, root / "links" / "linked.flac")
    expected["links/linked.flac"] = "line"
    os.symlink(root / "links" / "gone.flac", root / "links" / "broken.flac")
    expected["links/broken.flac"] = {"discover"}
    (root / "loop").mkdir()
    shutil.copy(GOOD[10], root / "loop" / "in_loop.flac")
    os.symlink(root / "loop", root / "loop" / "loop")
    expected["loop/in_loop.flac"] = "line"
    # A FIFO named .flac: opening it would block a worker forever, so discovery refuses it.
    os.mkfifo(root / "bad" / "fifo.flac")
    expected["bad/fifo.flac"] = {"discover"}
    return expected

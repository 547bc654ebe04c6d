"""Issue 21's two corpora, made with espeak-ng + sox, deterministic, with references.

- `sentences`: Harvard sentences (IEEE 1969, public domain) spoken by several espeak-ng voices
  at several paces, kept when the clip is 2-5 s long; 16 kHz FLAC.
- `words`: isolated words and digits (0.3-1 s), several voices and paces, half written at 8 kHz
  and half at 16 kHz (the service resamples; the loop lets faster-whisper do it).

Clip i of a corpus is the same file whatever N is (combinations are walked in one fixed order),
so 100 clips are a prefix of 2,000. Folders of 100 clips each, like a small VCTK tree.

    uv run python -m bench.corpora sentences 100 /tmp/sentences   # writes audio/ + references.json
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

from tests.fixtures.speech import SENTENCES as HARVARD_1_2, require_tools, speak

# Harvard lists 3-4 (public domain), on top of the 20 shipped in tests/fixtures/speech.py.
HARVARD_3_4 = [
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
]
SENTENCES = [*HARVARD_1_2, *HARVARD_3_4]
WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "water", "hello", "house", "cat", "dog", "happy", "tree", "bird", "forward", "learn",
]
# (espeak-ng voice, words per minute); distinct timbres and accents, as different speakers.
SENTENCE_VOICES = [
    ("en-us", 140), ("en-gb", 150), ("en-us+f3", 135), ("en-us+m3", 145),
    ("en-gb+f2", 140), ("en-us+m7", 150), ("en-gb-x-rp", 150), ("en-us+f4", 160),
]
WORD_VOICES = [
    ("en-us", 130), ("en-gb", 150), ("en-us+f3", 140), ("en-us+m3", 160),
    ("en-gb+f2", 130), ("en-us+m7", 150), ("en-gb-x-rp", 140), ("en-us+f4", 170),
]
SENTENCE_SECONDS = (2.0, 5.0)
WORD_SECONDS = (0.3, 1.0)
CORPORA = ("sentences", "words")
PER_FOLDER = 100
_DIGITS = dict(enumerate(WORDS[:10]))


def _speak(text: str, voice: str, speed: int, rate: int, out: Path, gap_10ms: int) -> float:
    """One trimmed clip (`tests.fixtures.speech.speak`); returns its duration in seconds."""
    speak(text, voice, out, speed, rate=rate, gap_10ms=gap_10ms, trim=True)
    return sf.info(out).duration


def _plan(corpus: str) -> Iterator[tuple[str, str, int, int]]:
    """(text, voice, wpm, sample rate) in the one fixed order clip ids follow."""
    if corpus == "sentences":
        for round_, text in itertools.product(range(16), SENTENCES):  # 10 rounds kept only 1,569 clips of 2-5 s
            for k, (voice, speed) in enumerate(SENTENCE_VOICES):
                if k % 2 == round_ % 2:  # half the voices per sentence per round, alternating
                    yield text, voice, speed + 10 * (round_ // 2), 16_000
    elif corpus == "words":
        for round_, (v, (voice, speed)) in itertools.product(range(20), enumerate(WORD_VOICES)):
            for w, word in enumerate(WORDS):
                rate = 8_000 if (w + v + round_) % 2 else 16_000
                yield word, voice, speed + 10 * (round_ % 5), rate
    else:
        raise ValueError(f"corpus must be one of {CORPORA}, not {corpus!r}")


def build(corpus: str, n: int, root: Path) -> tuple[dict[str, str], float]:
    """Write the first `n` clips of `corpus` under `root` (FLACs in folders of 100 + references.json).

    Returns ({clip id: reference text}, total audio seconds). Reuses a complete earlier build.
    """
    require_tools()
    done = root / "references.json"
    if done.is_file():
        meta = json.loads(done.read_text())
        if meta.get("corpus") == corpus and len(meta["references"]) == n:
            return meta["references"], meta["audio_seconds"]
    low, high = SENTENCE_SECONDS if corpus == "sentences" else WORD_SECONDS
    gap = 6 if corpus == "sentences" else 0
    references: dict[str, str] = {}
    seconds = 0.0
    plan = _plan(corpus)
    with ThreadPoolExecutor(2) as pool:
        while len(references) < n:
            batch = list(itertools.islice(plan, 2 * (n - len(references))))
            if not batch:
                raise RuntimeError(f"{corpus}: only {len(references)} clips within {low}-{high} s")
            staged = root / ".staging"
            spoken = list(pool.map(
                lambda job: _speak(job[1][0], job[1][1], job[1][2], job[1][3], staged / f"{job[0]}.flac", gap),
                enumerate(batch),
            ))
            for k, ((text, *_), duration) in enumerate(zip(batch, spoken, strict=True)):
                source = staged / f"{k}.flac"
                if len(references) < n and low <= duration <= high:
                    i = len(references)
                    folder = f"{corpus[0]}{i // PER_FOLDER:03d}"
                    clip_id = f"{folder}/{folder}_{i:05d}.flac"
                    (root / folder).mkdir(parents=True, exist_ok=True)
                    source.replace(root / clip_id)
                    references[clip_id] = text
                    seconds += duration
                else:
                    source.unlink()
    (root / ".staging").rmdir()
    done.write_text(json.dumps({"corpus": corpus, "audio_seconds": round(seconds, 3),
                                "references": references}, indent=1) + "\n")
    return references, round(seconds, 3)


def digits_as_words(text: str) -> str:
    """"7." -> "seven.": a lone digit is scored as its word, so "7" and "seven" both count as right
    (applied to every contender's text alike; Whisper writes digits either way)."""
    return re.sub(r"\b(\d)\b", lambda m: _DIGITS[int(m.group(1))], text)


if __name__ == "__main__":
    name, count, target = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    refs, audio_s = build(name, count, target)
    print(f"{len(refs)} clips, {audio_s:.1f} s of audio in {target}")

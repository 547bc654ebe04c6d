"""The hallucination check on a clip's final text: which flags a transcript carries, and why.

Whisper's temperature fallback retries a decode that *looks* failed, but it keeps the best of
its failures when every temperature fails, and a confident loop passes its thresholds. So the
final text is checked again, on rules that need no model (docs/QUALITY.md has the table):

- `repetition`: the text's gzip compression ratio is above the threshold (Whisper's own loop
  test), or a span of 1-8 words repeats back to back (4+ times for one word, 3+ for longer
  spans), or a short unit repeats 5+ times inside a word ("dadadadadada"), or, on 12+ words, more
  than half of the word 3-grams are repeats (a repeated n-gram ratio, after NeMo Granary's
  hallucination filter; the thresholds here are ours).
- `too_fast`: more words than speech allows in the clip's duration.
- `no_speech`: text on a clip the model itself gives a no-speech probability above the threshold.
- `low_confidence`: the kept decode's average token log-probability is below the threshold.
- `fallback_exhausted`: every temperature of the ladder failed the thresholds.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from typing import Literal

QualityFlag = Literal["repetition", "low_confidence", "no_speech", "too_fast", "fallback_exhausted"]

# The demo clips run at ~2 words/s and the 75-fold loop of issue 12 at ~25; 6 words per second of
# audio (plus one word of grace, for sub-second clips) is far above clear speech (a chosen limit).
MAX_WORDS_PER_SECOND = 6.0
GRACE_WORDS = 1
MAX_NGRAM = 8  # longest span (in words) checked for back-to-back repeats
SAME_WORD_RUN = 4  # "no no no no" is a loop; "very very very" can be speech
SAME_SPAN_RUN = 3  # a 2-8 word span three times in a row
INNER_RUN = 5  # a 2-6 character unit 5+ times back to back inside one word
RATIO_MIN_WORDS = 12  # the 3-gram ratio says little on shorter texts
MAX_REPEATED_TRIGRAM_RATIO = 0.5

_WORD = re.compile(r"\w+(?:'\w+)*")
_INNER_LOOP = re.compile(rf"(\w{{2,6}}?)\1{{{INNER_RUN - 1},}}")


def words(text: str) -> list[str]:
    """Lowercase words; hyphens and punctuation split ("Nie-dae-dae" is three words)."""
    return _WORD.findall(text.lower())


def compression_ratio(text: str) -> float:
    """Whisper's loop test: UTF-8 bytes over zlib-compressed bytes (0.0 for "")."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def words_per_second(text: str, duration: float) -> float | None:
    """Words over seconds of audio; None when the duration is 0."""
    return len(words(text)) / duration if duration > 0 else None


def longest_run(tokens: list[str], n: int) -> int:
    """Most times one n-gram occurs back to back in `tokens`."""
    best = 1 if len(tokens) >= n else 0
    for start in range(n):  # runs aligned to each phase of the n-gram grid
        run, previous = 0, None
        for i in range(start, len(tokens) - n + 1, n):
            gram = tuple(tokens[i : i + n])
            run = run + 1 if gram == previous else 1
            previous = gram
            best = max(best, run)
    return best


def repeated_ngram_ratio(tokens: list[str], n: int = 3) -> float:
    """Share of the text's n-grams that repeat an earlier one (0 = all distinct)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c - 1 for c in counts.values()) / len(grams)


def is_repetition(text: str, compression_ratio_threshold: float | None = 2.4) -> bool:
    """True when the text shows a repetition loop (the rules in the module docstring)."""
    if compression_ratio_threshold is not None and compression_ratio(text) > compression_ratio_threshold:
        return True
    tokens = words(text)
    if longest_run(tokens, 1) >= SAME_WORD_RUN:
        return True
    if any(longest_run(tokens, n) >= SAME_SPAN_RUN for n in range(2, MAX_NGRAM + 1)):
        return True
    if _INNER_LOOP.search(text.lower()):
        return True
    return len(tokens) >= RATIO_MIN_WORDS and repeated_ngram_ratio(tokens) > MAX_REPEATED_TRIGRAM_RATIO


def is_too_fast(text: str, duration: float) -> bool:
    """More words than MAX_WORDS_PER_SECOND allows in `duration` (plus GRACE_WORDS)."""
    return len(words(text)) > MAX_WORDS_PER_SECOND * duration + GRACE_WORDS


def flags_for(
    text: str,
    duration: float,
    *,
    avg_logprob: float | None,
    no_speech_prob: float | None,
    fallback_exhausted: bool,
    compression_ratio_threshold: float | None = 2.4,
    log_prob_threshold: float | None = -1.0,
    no_speech_threshold: float | None = 0.6,
) -> tuple[QualityFlag, ...]:
    """The flags a final transcript carries, in a fixed order; () for empty text."""
    if not text.strip():
        return ()  # nothing that could enter a training set
    flags: list[QualityFlag] = []
    if is_repetition(text, compression_ratio_threshold):
        flags.append("repetition")
    if log_prob_threshold is not None and avg_logprob is not None and avg_logprob < log_prob_threshold:
        flags.append("low_confidence")
    if no_speech_threshold is not None and no_speech_prob is not None and no_speech_prob > no_speech_threshold:
        flags.append("no_speech")
    if is_too_fast(text, duration):
        flags.append("too_fast")
    if fallback_exhausted:
        flags.append("fallback_exhausted")
    return tuple(flags)

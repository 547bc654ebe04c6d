"""Word error rate for tests: lowercase, strip punctuation, word-level Levenshtein."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalise(text: str) -> list[str]:
    """Lowercase words without punctuation; inner apostrophes stay ("it's", "man's")."""
    return _PUNCTUATION.sub(" ", text.lower()).split()


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Substitutions + deletions + insertions turning `reference` into `hypothesis`."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
            )
        previous = current
    return previous[-1]


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: total edits over total reference words (not a mean of per-clip WERs)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_words = normalise(ref)
        edits += edit_distance(ref_words, normalise(hyp))
        words += len(ref_words)
    if words == 0:
        raise ValueError("references contain no words")
    return edits / words

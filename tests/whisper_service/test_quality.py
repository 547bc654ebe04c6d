"""The hallucination check and the batched fallback rule, on texts and decodes given here.

The fallback loop is tested with a decode function written in the test, so the test can count
which clips each temperature re-decoded; the engines' real decodes through it are tested in
test_openai_engine.py and test_models.py.
"""

from __future__ import annotations

import json

import pytest

from tests.whisper_service.conftest import DEMO_DATA
from whisper_service.decode_options import DecodeKnobs, DecodeOptions
from whisper_service.engines.base import Attempt, decode_with_fallback, finish, needs_fallback
from whisper_service.quality import (
    compression_ratio,
    flags_for,
    is_repetition,
    is_too_fast,
    longest_run,
    repeated_ngram_ratio,
    words,
)

# The loop issue 12 found in the JSONL: tiny.en greedy on a 3 s synthetic clip.
NIE_DAE_LOOP = "Nie-" + "-".join(["dae"] * 75) + "..."


def options(**knobs: object) -> DecodeOptions:
    return DecodeOptions.build(
        DecodeKnobs(**knobs),  # type: ignore[arg-type]
        engine="faster-whisper", model="tiny.en", weights_sha256="0" * 64, compute_type="int8",
    )


def flags(text: str, duration: float = 3.0, **scores: object) -> tuple[str, ...]:
    values: dict[str, object] = {
        "avg_logprob": -0.3, "no_speech_prob": 0.05, "fallback_exhausted": False,
    }
    return flags_for(text, duration, **(values | scores))  # type: ignore[arg-type]


def test_the_75_fold_loop_is_flagged_repetition():
    assert words(NIE_DAE_LOOP)[:3] == ["nie", "dae", "dae"]
    assert compression_ratio(NIE_DAE_LOOP) > 2.4
    assert "repetition" in flags(NIE_DAE_LOOP)
    assert "too_fast" in flags(NIE_DAE_LOOP)  # 76 words in 3 s


@pytest.mark.parametrize(
    "text",
    [
        "no no no no",  # one word four times
        "I'm going to go. I'm going to go. I'm going to go.",  # a span three times
        "dadadadadadada",  # a loop inside one word
        "Thank you. Thank you. Thank you.",
    ],
)
def test_short_loops_that_compress_poorly_are_still_flagged(text: str):
    assert is_repetition(text), text


@pytest.mark.parametrize(
    "text",
    [
        "The birch canoe slid on the smooth planks.",
        "very very very good",  # three in a row can be speech
        "The the cat.",
        "Bye bye.",
        "Mississippi",  # a repeated unit, but only twice
    ],
)
def test_ordinary_text_is_not_repetition(text: str):
    assert not is_repetition(text), text


def test_demo_references_carry_no_flags():
    references = json.loads((DEMO_DATA / "references.json").read_text()).values()
    assert [r for r in references if flags(r)] == []


def test_helpers():
    assert longest_run(["a", "b", "a", "b", "a", "b", "c"], 2) == 3
    assert longest_run(["x", "a", "b", "a", "b"], 2) == 2  # the odd phase is checked too
    assert longest_run([], 1) == 0
    assert repeated_ngram_ratio("a b c a b c a b c".split()) == pytest.approx(4 / 7)
    assert compression_ratio("") == 0.0


def test_too_fast_scales_with_duration():
    assert not is_too_fast("one two three", 0.4)  # 3 words: 6 x 0.4 + 1 = 3.4 allowed
    assert is_too_fast("one two three four", 0.4)
    assert not is_too_fast(" ".join(["word"] * 18), 3.0)
    assert is_too_fast(" ".join(["word"] * 20), 3.0)


def test_each_flag_has_its_rule():
    assert flags("The birch canoe.") == ()
    assert flags("The birch canoe.", avg_logprob=-1.2) == ("low_confidence",)
    assert flags("The birch canoe.", no_speech_prob=0.8) == ("no_speech",)
    assert flags("The birch canoe.", fallback_exhausted=True) == ("fallback_exhausted",)
    assert flags("", avg_logprob=-3.0, no_speech_prob=0.99, fallback_exhausted=True) == ()
    assert flags("The birch canoe.", avg_logprob=None, no_speech_prob=None) == ()


# --- the batched fallback rule ---


class LadderDecode:
    """Decodes from a table {clip: [attempt per temperature]}, recording each call's clips."""

    def __init__(self, table: dict[int, list[tuple[str, float, float]]]) -> None:
        self.table = table
        self.calls: list[tuple[float, list[int]]] = []

    def __call__(self, indices: list[int], temperature: float) -> list[Attempt]:
        self.calls.append((temperature, list(indices)))
        step = len([c for c in self.calls if c[0] < temperature])
        return [
            Attempt(text, "en", logprob, no_speech, temperature)
            for text, logprob, no_speech in (self.table[i][step] for i in indices)
        ]


GOOD = ("The birch canoe slid on the smooth planks.", -0.3, 0.05)
LOOP = (NIE_DAE_LOOP, -0.2, 0.05)
UNSURE = ("The merch can you sleep.", -1.4, 0.1)
SILENT = ("you", -1.5, 0.9)


def test_fallback_re_decodes_only_the_failing_clips():
    decode = LadderDecode({0: [GOOD], 1: [LOOP, GOOD], 2: [UNSURE, UNSURE, GOOD], 3: [SILENT]})
    kept = decode_with_fallback(4, decode, options())
    assert decode.calls == [(0.0, [0, 1, 2, 3]), (0.2, [1, 2]), (0.4, [2])]
    assert [(a.text, a.temperature, exhausted) for a, exhausted in kept] == [
        (GOOD[0], 0.0, False), (GOOD[0], 0.2, False), (GOOD[0], 0.4, False), ("you", 0.0, False)
    ]
    # the silent clip was not retried, and its text goes (Whisper's no-speech rule)
    assert finish(*kept[3], 1.0, options()).text == ""


def test_a_clean_batch_costs_one_decode():
    decode = LadderDecode({i: [GOOD] for i in range(8)})
    decode_with_fallback(8, decode, options())
    assert decode.calls == [(0.0, list(range(8)))]


def test_exhausted_ladder_keeps_the_best_non_loop_and_flags_it():
    opts = options(temperatures=(0.0, 0.5, 1.0))
    ladder = [LOOP, ("A worse guess.", -1.8, 0.1), ("A better guess.", -1.2, 0.1)]
    [(attempt, exhausted)] = decode_with_fallback(1, LadderDecode({0: ladder}), opts)
    assert (attempt.text, attempt.temperature, exhausted) == ("A better guess.", 1.0, True)
    transcript = finish(attempt, exhausted, 3.0, opts)
    assert transcript.flags == ("low_confidence", "fallback_exhausted")
    # every step a loop: the most confident loop is kept, and flagged
    [(loop, _)] = decode_with_fallback(1, LadderDecode({0: [LOOP, LOOP, LOOP]}), opts)
    assert "repetition" in finish(loop, True, 3.0, opts).flags


def test_without_a_ladder_nothing_is_retried_and_nothing_is_exhausted():
    opts = options(temperatures=(0.0,))
    decode = LadderDecode({0: [LOOP]})
    [(attempt, exhausted)] = decode_with_fallback(1, decode, opts)
    assert len(decode.calls) == 1 and exhausted
    assert finish(attempt, exhausted, 3.0, opts).flags == ("repetition", "too_fast")


def test_needs_fallback_is_whispers_rule():
    opts = options()
    assert needs_fallback(Attempt(*LOOP[:1], "en", -0.2, 0.05, 0.0), opts)
    assert needs_fallback(Attempt("text", "en", -1.2, 0.05, 0.0), opts)
    assert not needs_fallback(Attempt("text", "en", -1.2, 0.7, 0.0), opts)  # silence
    assert not needs_fallback(Attempt("text", "en", -0.5, 0.7, 0.0), opts)
    off = options(compression_ratio_threshold=None, log_prob_threshold=None)
    assert not needs_fallback(Attempt(NIE_DAE_LOOP, "en", -5.0, 0.0, 0.0), off)

"""Whisper's seek rule on one window's tokens (`engines.seek.split_window`), against the cases
`transcribe()` distinguishes. Token ids: 50 stands for `<|0.00|>`, so 50 + k is k x 0.02 s;
ids below 50 are text."""

from __future__ import annotations

from whisper_service.engines.seek import split_window

TS = 50  # timestamp_begin


def ts(seconds: float) -> int:
    return TS + round(seconds / 0.02)


def test_a_decode_ending_on_one_timestamp_covered_its_window():
    tokens = [ts(0), 1, 2, ts(2.0), ts(2.0), 3, ts(3.5)]
    split = split_window(tokens, TS, size=400)
    assert split.covered and split.advance == 400
    assert [(s.start, s.end) for s in split.stretches] == [(0.0, 2.0), (2.0, 3.5)]
    assert [t for s in split.stretches for t in s.tokens] == tokens


def test_a_decode_ending_on_a_pair_goes_on_from_the_last_closed_stretch():
    """`<|17.00|><|17.00|>` then end of text: the audio after 17 s was never transcribed, so the
    next window starts there (17 s = 1700 mel frames) and the unfinished text is dropped."""
    tokens = [ts(0), 1, ts(4.0), ts(4.0), 2, ts(17.0), ts(17.0), 3]
    split = split_window(tokens, TS, size=2118)
    assert not split.covered and split.advance == 1700
    assert [(s.start, s.end) for s in split.stretches] == [(0.0, 4.0), (4.0, 17.0)]
    assert 3 not in [t for s in split.stretches for t in s.tokens]


def test_without_a_timestamp_pair_the_whole_decode_is_one_stretch():
    assert split_window([1, 2, 3], TS, size=800).stretches[0].tokens == [1, 2, 3]
    assert split_window([1, 2, 3], TS, size=800).covered
    split = split_window([ts(0), 1, 2, ts(5.0)], TS, size=800)
    assert split.covered and [(s.start, s.end) for s in split.stretches] == [(0.0, 5.0)]


def test_a_pair_at_zero_cannot_send_the_loop_back_to_where_it_was():
    split = split_window([ts(0), ts(0), 1, 2], TS, size=800)
    assert split.covered and split.advance == 800


def test_text_placed_after_the_audio_ends_is_dropped():
    """What tiny.en wrote on the 0.5 s tail of a 28.5 s clip: "1." a second apart up to 56 s."""
    tokens = [ts(0.0), 1, ts(0.3), ts(0.5), 9, ts(1.0), ts(1.0), 9, ts(2.0)]
    split = split_window(tokens, TS, size=47)  # 0.47 s of audio in this window
    assert [(s.start, s.end) for s in split.stretches] == [(0.0, 0.3)]
    assert split.dropped == 2 and split.covered

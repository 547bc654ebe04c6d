"""Whisper's seek rule: where one 30 s window's decode ends and the next window starts.

A window's decode need not cover its audio. Whisper emits timestamp pairs around each stretch of
text; when the decode stops after a *pair* (or mid-stretch), the audio after the last closed
stretch was not transcribed, and `transcribe()` (openai-whisper's and faster-whisper's alike)
drops the unfinished text and decodes again from that timestamp. A decode that ends on a single
timestamp covered its window. Skipping that second look is not a shortcut: on 15-28 s segments of
read speech it lost the last sentence of two segments in seven (issue 22).

The rule is faster-whisper's `_split_segments_by_timestamps`, kept here as a pure function so the
service's batched path follows it without a private API, and so it can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAMES_PER_SECOND = 100  # log-mel frames (hop 160 at 16 kHz)
INPUT_STRIDE = 2  # mel frames per encoder position: one timestamp step is 2 frames
TIME_PRECISION = 0.02  # seconds per timestamp step


@dataclass(frozen=True)
class Stretch:
    """Text tokens of one closed stretch, timestamps included, and its span in the window (s)."""

    tokens: list[int]
    start: float
    end: float


@dataclass(frozen=True)
class WindowSplit:
    stretches: list[Stretch]
    advance: int  # mel frames to seek past this window's start
    covered: bool  # the decode covered its window: nothing was left for a next look
    dropped: int = 0  # stretches that started after the audio ended


def split_window(tokens: list[int], timestamp_begin: int, size: int) -> WindowSplit:
    """Cut a window's decoded tokens (text and timestamps) into stretches and say how far it got.

    `size` is the window's content in mel frames (at most 3000). Without a timestamp pair the
    whole decode is one stretch and the window counts as covered, as in `transcribe()`. One
    departure from `transcribe()`: a stretch that starts at or after the end of the window's audio
    is dropped. On a 0.5 s tail of room noise tiny.en wrote "1." at 28.5, 29.0, ... 56.0 s of a
    28.5 s clip; the loop keeps that, and nothing real can be said after the audio ends.
    """
    single_ending = len(tokens) >= 2 and tokens[-2] < timestamp_begin <= tokens[-1]
    pairs = [i for i in range(1, len(tokens)) if tokens[i] >= timestamp_begin and tokens[i - 1] >= timestamp_begin]
    if not pairs:
        stamps = [t for t in tokens if t >= timestamp_begin]
        end = size / FRAMES_PER_SECOND
        if stamps and stamps[-1] != timestamp_begin:
            end = (stamps[-1] - timestamp_begin) * TIME_PRECISION
        return WindowSplit([Stretch(list(tokens), 0.0, end)], size, True)
    cuts = pairs + [len(tokens)] if single_ending else pairs
    stretches, last, dropped = [], 0, 0
    content_end = size / FRAMES_PER_SECOND
    for cut in cuts:
        piece = tokens[last:cut]
        start = (piece[0] - timestamp_begin) * TIME_PRECISION
        if start < content_end:
            stretches.append(Stretch(piece, start, (piece[-1] - timestamp_begin) * TIME_PRECISION))
        else:  # text placed after the audio ends is made up ("1." 1 s apart, on and on)
            dropped += 1
        last = cut
    if single_ending:
        return WindowSplit(stretches, size, True, dropped)
    advance = (tokens[last - 1] - timestamp_begin) * INPUT_STRIDE
    if advance <= 0:  # a pair at 0.00 and nothing closed: looking again would loop forever
        return WindowSplit(stretches, size, True, dropped)
    return WindowSplit(stretches, min(advance, size), advance >= size, dropped)

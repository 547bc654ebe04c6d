"""SubRip (`srt`) and WebVTT (`vtt`) bodies from a transcript's timed segments (OpenAI's formats)."""

from __future__ import annotations

from collections.abc import Sequence

from whisper_service.engines.base import Segment


def timestamp(seconds: float, decimal: str) -> str:
    """`HH:MM:SS,mmm` (srt) or `HH:MM:SS.mmm` (vtt); rounded to the millisecond."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def to_srt(segments: Sequence[Segment]) -> str:
    """Numbered cues from 1, blank line between; "" when there is no text."""
    cues = [
        f"{i}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text}\n"
        for i, s in enumerate(segments, 1)
    ]
    return "\n".join(cues)


def to_vtt(segments: Sequence[Segment]) -> str:
    """The WEBVTT header, then one cue per segment."""
    cues = [f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])

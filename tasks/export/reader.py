"""Stream the lines of a results root, one at a time, in a stable order; find each line's audio.

Memory stays flat in corpus size: folders are listed (one name each), then each `{folder}.jsonl`
is read line by line. The order (folders sorted, lines as stored) is the same on every pass, so
an export can plan its shards in one pass and write them in another, and a rerun finds the same
shard boundaries.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import soundfile as sf

from tasks.storage import Store, jsonl_name


@dataclass(frozen=True)
class Sample:
    """One JSONL line, parsed; `raw` is the line's bytes (what a shard's checksum covers)."""

    id: str
    folder: str
    transcription: str
    token_array: list[int]
    quality: dict[str, Any] | None
    raw: bytes
    segment: SegmentSpan | None = None  # a long recording's segment (issue 22); None: a whole file

    @property
    def audio_id(self) -> str:
        """The id of the file holding this line's audio (the source, for a segment)."""
        return self.segment.source_id if self.segment is not None else self.id


@dataclass(frozen=True)
class SegmentSpan:
    """Where a segment's line lies in its source: seconds, as the line's `start`/`end` say."""

    source_id: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return round(self.end - self.start, 6)


@dataclass(frozen=True)
class BadLine:
    """A line that is not a result line; reported in the export's errors, never exported."""

    id: str  # "{folder}.jsonl:{line number}" when the line has no readable id
    folder: str
    error: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_samples: int
    channels: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


# Without a manifest the tokens are exported as int64: a larger value would overflow the writer.
INT64_LIMIT = 1 << 63


def iter_lines(results_root: str, token_limit: int = INT64_LIMIT) -> Iterator[Sample | BadLine]:
    """Every line of every `{folder}.jsonl` (never `*.errors.jsonl`), folders in sorted order.

    A line with a token outside [0, token_limit) is a BadLine: the writers store tokens in the
    manifest's dtype, sized to the codebook, and one value past it would fail the whole shard.
    """
    store = Store(results_root)
    for folder in sorted(store.folders_with_results()):  # the one rule of what a result is (`output_of`)
        relative = jsonl_name(folder)
        with store.fs.open(store.path(relative), "rb") as f:
            for number, line in enumerate(f, start=1):
                raw = line.strip()
                if raw:
                    yield parse_line(raw, folder, f"{relative}:{number}", token_limit)


def parse_line(raw: bytes, folder: str, where: str, token_limit: int = INT64_LIMIT) -> Sample | BadLine:
    """The line as a Sample, or a BadLine naming `where` (file:line) and what is wrong.

    Args:
        token_limit: every token must lie in [0, token_limit): the codebook size from the
            manifest, else what int64 holds.
    """
    record: object = None
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError(f"a JSON {type(record).__name__}, not an object")
        return Sample(
            id=_text(record, "id"), folder=folder, transcription=_text(record, "transcription"),
            token_array=_tokens(record, token_limit), quality=_quality(record), raw=raw, segment=_segment(record),
        )
    except (ValueError, TypeError, KeyError) as e:
        file_id = record.get("id") if isinstance(record, dict) else None
        reason = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        return BadLine(id=file_id if isinstance(file_id, str) else where, folder=folder,
                       error=f"{where}: not a result line: {reason}", raw=raw)


def _segment(record: dict) -> SegmentSpan | None:
    """A segment line's span (`source_id`, `start`, `end`); None for a whole file's line."""
    if "source_id" not in record:
        return None
    start, end = record.get("start"), record.get("end")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (start, end)) or not 0 <= start < end:
        raise TypeError("a segment line needs numbers 0 <= 'start' < 'end'")
    return SegmentSpan(source_id=_text(record, "source_id"), start=float(start), end=float(end))


def _text(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} is {type(value).__name__}, not a string")
    return value


def _tokens(record: dict, limit: int) -> list[int]:
    tokens = record["token_array"]
    # type() is int, not isinstance: JSON true/false are bools, which isinstance counts as ints.
    if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
        raise TypeError("'token_array' is not a list of non-negative integers")
    if tokens and (top := max(tokens)) >= limit:
        raise ValueError(f"token {top} at index {tokens.index(top)} is not below {limit} "
                         "(the codebook size manifest.json gives, or int64's range without one)")
    return tokens


def _quality(record: dict) -> dict[str, Any] | None:
    quality = record.get("quality")
    if quality is not None and not isinstance(quality, dict):
        raise TypeError("'quality' is not an object")
    return quality


def audio_info(path: str) -> AudioInfo:
    """Sample rate, length and channels from the file's header (no decode of the samples).

    Raises:
        OSError: the file is missing or unreadable; sf.LibsndfileError (a RuntimeError): not audio.
    """
    if _local(path):
        if not os.path.isfile(path):  # libsndfile would say "System error", not which
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        info = sf.info(path)
    else:
        with fsspec.open(path, "rb") as f:
            info = sf.info(f)
    return AudioInfo(sample_rate=int(info.samplerate), num_samples=int(info.frames), channels=int(info.channels))


def read_audio(path: str) -> bytes:
    if _local(path):  # plain open: fsspec's URL parsing costs more than reading a cached clip
        with open(path, "rb") as f:
            return f.read()
    with fsspec.open(path, "rb") as f:
        return f.read()


def audio_size(path: str) -> int:
    if _local(path):
        return os.stat(path).st_size
    fs, stripped = fsspec.url_to_fs(path)
    return int(fs.size(stripped))


def _local(path: str) -> bool:
    return "://" not in path


def quality_duration(quality: Any) -> float | None:
    """The line's `duration` (seconds, as the service measured it), when it is a positive number."""
    value = flat_quality(quality).get("duration")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def flat_quality(quality: Any) -> dict[str, Any]:
    """A line's `quality` as one flat dict, the one reading every consumer shares.

    Merge writes it flat (`tasks.merge.quality_object`); a line written by other hands may group
    fields (e.g. `{"audio": {...}}`): those groups are lifted one level, top-level keys winning.
    Anything but an object is no quality at all.
    """
    if not isinstance(quality, dict):
        return {}
    flat = {k: v for k, v in quality.items() if not isinstance(v, dict)}
    for value in quality.values():
        if isinstance(value, dict):
            for k, v in value.items():
                flat.setdefault(k, v)
    return flat

"""Long files in the run plan: found cheaply, shared out by duration, expanded into segments.

At plan time a file is long when its header says it lasts more than `segment_over_s`. Only files
whose size could hold that much audio are opened (`PROBE_BYTES_PER_S`: 32 kbit/s, below any
FLAC/WAV of speech and most MP3s), and only their header is read: a corpus of short clips costs
no extra read. Long files then go to their own tasks, sized by seconds of audio, not file count:

    _runs/{run}/segment/00000.json   SegmentTask: long files, up to SEGMENT_TASK_S of audio (a
                                     longer file alone): the VAD pass, one per file
    _runs/{run}/long/00012.json      LongShard: time ranges of long files, up to LONG_SHARD_S of
                                     audio, for shard 12's transcribe and tokenise tasks

so a 10-hour file is one VAD task and 20 transcribe/tokenise pairs, not one task nor 3,600.
A stage task expands each range into the file's segments that start inside it (`expand`), each
an `AudioFile` whose id is the segment's line id: reuse checks, failures and merge then work
per segment with the machinery every file uses.
"""

from __future__ import annotations

from typing import Any

from tasks.audio_stream import probe
from tasks.records import AudioFile, Batch, Record, Segment, Shard
from tasks.segments import load_segment_list, segmentation_fingerprint
from tasks.settings import PipelineSettings, SegmentOptions
from tasks.storage import Store
from whisper_service.audio import AudioDecodeError

PROBE_BYTES_PER_S = 4_000  # files under segment_over_s x this many bytes are taken as short unopened
LONG_SHARD_S = 1800.0  # seconds of long audio per transcribe/tokenise task
SEGMENT_TASK_S = 4 * 3600.0  # seconds of long audio per VAD task


class LongItem(Record):
    """The part of a long file one shard covers: segments starting in [start, end) seconds."""

    id: str
    start: float
    end: float


class LongShard(Record):
    index: int
    items: list[LongItem]


class SegmentTask(Record):
    index: int
    files: list[AudioFile]


def long_duration(file: AudioFile, options: SegmentOptions, storage_options: dict[str, Any] | None = None) -> float | None:
    """The file's duration when it is to be segmented, else None (short, unreadable, or --no-segment).

    An unreadable header is left to the normal path, which reports it per file.
    """
    if options.no_segment or file.source.size < options.segment_over_s * PROBE_BYTES_PER_S:
        return None
    try:
        duration = probe(file.path, storage_options).duration
    except (AudioDecodeError, OSError):
        return None
    return duration if duration > options.segment_over_s else None


class LongPacker:
    """Long files into VAD tasks and time ranges into shards, both by seconds of audio."""

    def __init__(self, store: Store, run_dir: str, first_shard: int) -> None:
        self.store, self.run_dir = store, run_dir
        self.next_shard = first_shard
        self.shards: dict[int, list[int]] = {}  # long shard -> the VAD tasks it waits for
        self.segment_tasks = 0
        self.files = 0
        self.seconds = 0.0
        self._task: list[AudioFile] = []
        self._task_s = 0.0
        self._items: list[tuple[AudioFile, LongItem]] = []
        self._items_s = 0.0
        self._needs: set[int] = set()  # VAD tasks of the files in the open shard

    def add(self, file: AudioFile, duration: float) -> list[Shard]:
        """Queue one long file; returns the shards that filled (written by the caller, like ShardPacker's)."""
        self.files += 1
        self.seconds += duration
        if self._task and self._task_s + duration > SEGMENT_TASK_S:
            self._flush_task()
        self._task.append(file)
        self._task_s += duration
        task = self.segment_tasks
        out = []
        start = 0.0
        while start < duration:
            take = min(duration - start, LONG_SHARD_S - self._items_s)
            end = duration + 1.0 if start + take >= duration else start + take  # the last range takes the tail
            self._items.append((file, LongItem(id=file.id, start=start, end=end)))
            self._needs.add(task)
            self._items_s += take
            start += take
            if self._items_s >= LONG_SHARD_S:
                out.append(self._flush_items())
        return out

    def close(self) -> list[Shard]:
        if self._task:
            self._flush_task()
        return [self._flush_items()] if self._items else []

    def _flush_task(self) -> None:
        task = SegmentTask(index=self.segment_tasks, files=self._task)
        self.store.write_bytes(f"{self.run_dir}/segment/{task.index:05d}.json", task.model_dump_json().encode())
        self.segment_tasks += 1
        self._task, self._task_s = [], 0.0

    def _flush_items(self) -> Shard:
        index = self.next_shard
        self.next_shard += 1
        long = LongShard(index=index, items=[item for _, item in self._items])
        self.store.write_bytes(f"{self.run_dir}/long/{index:05d}.json", long.model_dump_json().encode())
        batches: list[Batch] = []
        for file, _ in self._items:
            if not batches or batches[-1].folder != file.folder:
                batches.append(Batch(folder=file.folder, files=[]))
            if file not in batches[-1].files:
                batches[-1].files.append(file)
        self.shards[index] = sorted(self._needs)
        self._needs = set()
        self._items, self._items_s = [], 0.0
        return Shard(index=index, batches=batches)


def load_segment_task(location: str, index: int) -> SegmentTask:
    data = Store(location).read_bytes(f"segment/{index:05d}.json")
    if data is None:
        raise FileNotFoundError(f"run plan file missing: {location}/segment/{index:05d}.json")
    return SegmentTask.model_validate_json(data)


def load_long_shard(location: str, index: int) -> LongShard | None:
    data = Store(location).read_bytes(f"long/{index:05d}.json")
    return None if data is None else LongShard.model_validate_json(data)


def segment_options(plan_settings: dict[str, Any]) -> SegmentOptions:
    return SegmentOptions(**plan_settings.get("segmentation", {}))


def segment_lines(f: AudioFile, store: Store, fingerprint: str) -> list[tuple[AudioFile, Segment]] | None:
    """Long file `f`'s lines (AudioFiles whose id is the line id) with their segments, from its
    stored segment list; None when there is no list for this version and fingerprint, or it has
    no speech."""
    listing = load_segment_list(store, f, fingerprint)
    if listing is None or not listing.segments:
        return None
    return [(AudioFile(id=s.line_id(f.id), path=f.path, source=f.source), s) for s in listing.segments]


def expand(
    files: list[AudioFile], items: list[LongItem], store: Store, options: SegmentOptions, whole: bool = False
) -> tuple[list[AudioFile], dict[str, tuple[float, float]]]:
    """`files` with each long file replaced by its segments (in `items`' ranges; all of them with
    `whole`), as AudioFiles whose id is the line id; plus each segment's span by id.

    A long file with no stored segment list for this fingerprint stays as itself: its VAD task
    failed (a decode Failure is stored under its id) or never ran (merge reports it missing).
    """
    fingerprint = segmentation_fingerprint(options)
    ranges: dict[str, list[LongItem]] = {}
    for item in items:
        ranges.setdefault(item.id, []).append(item)
    out: list[AudioFile] = []
    spans: dict[str, tuple[float, float]] = {}
    for f in files:
        if f.id not in ranges:
            out.append(f)
            continue
        lines = segment_lines(f, store, fingerprint)
        if lines is None:  # no list (merge reports why), or no speech
            if whole:
                out.append(f)
            continue
        for line, s in lines:
            if whole or any(r.start <= s.start < r.end for r in ranges[f.id]):
                out.append(line)
                spans[line.id] = (s.start, s.end)
    return out, spans


def line_files(
    files: list[AudioFile], long_ids: set[str], store: Store, options: SegmentOptions
) -> list[AudioFile] | None:
    """`files` as a merge of this run would join them: each long file (id in `long_ids`) replaced by
    its stored segments, as AudioFiles whose id is the line id. None when a long file has no stored
    segment list for this version and fingerprint (its VAD task must run) or one with no speech
    (merge reports it): then only a merge knows the folder's lines. One read per long file."""
    fingerprint = segmentation_fingerprint(options)
    out: list[AudioFile] = []
    for f in files:
        if f.id not in long_ids:
            out.append(f)
            continue
        lines = segment_lines(f, store, fingerprint)
        if lines is None:
            return None
        out += [line for line, _ in lines]
    return out


def expand_shard(
    location: str, index: int, batches: list[Batch], settings: PipelineSettings, plan_settings: dict[str, Any],
) -> tuple[list[Batch], dict[str, tuple[float, float]]]:
    """A shard's batches with its long files' ranges expanded into segments (unchanged for short files)."""
    long = load_long_shard(location, index)
    if long is None:
        return batches, {}
    store = Store(settings.results_root)
    options = segment_options(plan_settings)
    out, spans = [], {}
    for batch in batches:
        files, more = expand(batch.files, long.items, store, options)
        spans.update(more)
        out.append(Batch.model_construct(folder=batch.folder, files=files))
    return out, spans

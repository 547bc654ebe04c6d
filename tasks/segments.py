"""Long recordings cut into training segments: Silero VAD, then a deterministic cutter (issue 22).

1. `speech_regions`: hysteresis on the per-window speech probability (starts at `threshold`,
   ends below `threshold - 0.15` held for `min_silence_s`), regions under `min_speech_s` dropped.
2. `cut_segments`: regions are grouped left to right into segments of at most `max_segment_s`,
   padding included. Where a segment must end, it ends in the longest pause among the places
   that leave it at least `min_segment_s` long; a pause of `max_pause_s` or more always ends one.
   A region of unbroken speech longer than the limit is split at its quietest window.
3. Each segment is padded by `pad_s`; across a pause of up to 4 pads neighbours meet in its
   middle. Never overlapping, never past `max_segment_s`, never outside the file; ms-rounded.

Same probabilities and options, same segments: no randomness, ties broken by position.
`segment_source` runs the whole stage on one file, decoding in blocks (`tasks.audio_stream`).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tasks.audio_stream import iter_blocks, open_source
from tasks.records import AudioFile, Failure, Segment, SegmentList, StageReport
from tasks.settings import PipelineSettings, SegmentOptions
from tasks.storage import Store, stem_id
from tasks.vad import RATE, WINDOW, model_sha256, speech_probabilities
from whisper_service.audio import AudioDecodeError

FRAME_S = WINDOW / RATE  # 0.032 s per probability
NEG_OFFSET = 0.15  # speech ends below threshold - this (faster-whisper's default neg_threshold)


def segmentation_fingerprint(options: SegmentOptions) -> str:
    """What makes a segment list: the VAD model's content hash and the cutting options."""
    key = {"vad": f"silero_vad_v6:{model_sha256()}", **options.cutting()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def speech_regions(probs: np.ndarray, options: SegmentOptions) -> list[tuple[int, int]]:
    """Speech as [start, end) window indices."""
    on, off = options.threshold, max(options.threshold - NEG_OFFSET, 0.01)
    hold = max(1, int(round(options.min_silence_s / FRAME_S)))
    shortest = int(round(options.min_speech_s / FRAME_S))
    regions: list[tuple[int, int]] = []
    start: int | None = None
    quiet = 0  # consecutive windows below `off` while in speech
    for i, p in enumerate(probs.tolist()):
        if start is None:
            if p >= on:
                start, quiet = i, 0
            continue
        quiet = quiet + 1 if p < off else 0
        if quiet >= hold:
            end = i - quiet + 1
            if end - start >= max(shortest, 1):
                regions.append((start, end))
            start = None
    if start is not None and len(probs) - start >= max(shortest, 1):
        regions.append((start, len(probs)))
    return regions


def _split_long(region: tuple[int, int], probs: np.ndarray, limit: int, least: int) -> list[tuple[int, int]]:
    """Unbroken speech longer than `limit` windows, cut at its quietest windows (smoothed over
    ~100 ms), each piece at least `least` windows where it can be; the latest of equals wins."""
    out = []
    start, end = region
    while end - start > limit:
        lo, hi = start + min(least, limit // 2), start + limit
        window = np.convolve(probs[lo : hi + 1], np.ones(3) / 3, mode="same")
        cut = lo + int(len(window) - 1 - np.argmin(window[::-1]))
        out.append((start, cut))
        start = cut
    out.append((start, end))
    return out


def cut_segments(
    regions: list[tuple[int, int]], probs: np.ndarray, duration: float, options: SegmentOptions
) -> list[Segment]:
    """Speech regions (window indices) grouped into padded, non-overlapping segments (seconds)."""
    pad = int(round(options.pad_s / FRAME_S))
    limit = int(options.max_segment_s / FRAME_S) - 2 * pad  # speech span allowed in one segment
    least = int(round(options.min_segment_s / FRAME_S)) - 2 * pad
    long_pause = options.max_pause_s / FRAME_S
    pieces = [p for r in regions for p in _split_long(r, probs, limit, max(least, 1))]
    groups: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        start = pieces[i][0]
        j = i  # last piece that fits with pieces[i]
        while (
            j + 1 < len(pieces) and pieces[j + 1][1] - start <= limit and pieces[j + 1][0] - pieces[j][1] < long_pause
        ):
            j += 1
        if j + 1 < len(pieces) and pieces[j + 1][0] - pieces[j][1] < long_pause:
            # The next piece does not fit: end in the longest pause that leaves the segment long enough.
            candidates = [k for k in range(i, j + 1) if pieces[k][1] - start >= least] or [j]
            j = max(candidates, key=lambda k: (pieces[k + 1][0] - pieces[k][1], k))
        groups.append((start, pieces[j][1]))
        i = j + 1
    return _pad(groups, pad, duration, limit + 2 * pad)


def _pad(groups: list[tuple[int, int]], pad: int, duration: float, longest: int) -> list[Segment]:
    """Pad each group by `pad` windows; across a short pause (<= 4 pads) neighbours meet in its
    middle, so nothing quiet between them (a soft consonant the VAD missed) falls outside both.
    Never past `longest` windows, never overlapping, never outside the file."""
    segments = []
    for n, (start, end) in enumerate(groups):
        before = after = pad
        if n:
            gap = start - groups[n - 1][1]
            before = gap // 2 if gap <= 4 * pad else min(pad, gap // 2)
        else:
            before = min(pad, start)
        if n + 1 < len(groups):
            gap = groups[n + 1][0] - end
            after = gap - gap // 2 if gap <= 4 * pad else min(pad, gap - gap // 2)
        room = longest - (end - start)
        if before + after > room:
            before = min(before, room // 2)
            after = min(after, room - before)
        s = max(0.0, (start - before) * FRAME_S)
        e = min(duration, (end + after) * FRAME_S)
        if e > s:
            segments.append(Segment(start=round(s, 3), end=round(e, 3)))
    return segments


def segment_audio(probs: np.ndarray, duration: float, options: SegmentOptions) -> list[Segment]:
    """The whole cutter on one file's probabilities."""
    return cut_segments(speech_regions(probs, options), probs, duration, options)


def segment_source(
    file: AudioFile, options: SegmentOptions, storage_options: dict[str, Any] | None = None, run_id: str | None = None
) -> SegmentList:
    """Segment one long file, decoding it block by block (bounded memory, whatever its length).

    Raises:
        AudioDecodeError: the file cannot be decoded.
        OSError: the file cannot be read.
    """
    with open_source(file.path, storage_options) as f:
        probs, samples = speech_probabilities(iter_blocks(f, RATE))
    duration = round(samples / RATE, 3)
    return SegmentList(
        id=file.id, source=file.source, fingerprint=segmentation_fingerprint(options), duration=duration,
        segments=segment_audio(probs, duration, options), run_id=run_id,
    )


# -- the segmentation stage: segment lists on storage, reused on reruns ------------------------------
SEGMENTS_DIR = "segments"


def segment_list_path(file_id: str) -> str:
    """`book/ch01.flac` -> `segments/book/ch01.json` (mirrors the input path, like every intermediate)."""
    return f"{SEGMENTS_DIR}/{stem_id(file_id)}.json"


def load_segment_list(store: Store, file: AudioFile, fingerprint: str) -> SegmentList | None:
    """The stored segment list of this version of `file` cut with `fingerprint`, or None."""
    data = store.read_bytes(segment_list_path(file.id))
    if data is None:
        return None
    try:
        listing = SegmentList.model_validate_json(data)
    except ValueError:  # torn or foreign: segment again
        return None
    ok = listing.id == file.id and listing.source == file.source and listing.fingerprint == fingerprint
    return listing if ok else None


def vad_threads() -> int:
    """Files one segmentation task cuts side by side: the cores it may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def segment_files(
    files: list[AudioFile], options: SegmentOptions, store: Store, run_id: str | None = None, index: int = 0
) -> StageReport:
    """Segment each long file unless its list is stored for this version and fingerprint.

    A file that cannot be decoded gets a decode `Failure` in place of both stages' records (one
    error line at merge, under the file's id); the others go on. A file with no speech at all gets
    a `quality` one (listed in the errors file, not counted as failed, like `--drop-flagged`), so
    its lines never vanish silently.
    """
    fingerprint = segmentation_fingerprint(options)
    todo = [f for f in files if load_segment_list(store, f, fingerprint) is None]
    reused, done, failed = len(files) - len(todo), 0, 0
    seconds = 0.0

    def cut(f: AudioFile) -> SegmentList | Exception:
        try:
            return segment_source(f, options, run_id=run_id)
        except (AudioDecodeError, OSError) as e:
            return e

    # Decoding, resampling and the ONNX session release the GIL: files side by side use the
    # cores a single VAD (one thread, like faster-whisper's) leaves idle. map keeps file order.
    with ThreadPoolExecutor(max_workers=max(1, min(len(todo), vad_threads()))) as pool:
        for f, listing in zip(todo, pool.map(cut, todo), strict=True):
            if isinstance(listing, Exception):
                store.remove(segment_list_path(f.id))
                for kind in ("transcriptions", "tokens"):
                    store.write_record(kind, Failure(id=f.id, stage="decode", error=f"cannot segment: {listing}",
                                                     source=f.source))
                failed += 1
                continue
            store.write_bytes(segment_list_path(f.id), listing.model_dump_json().encode())
            if not listing.segments:
                error = f"no speech: Silero VAD found none in {listing.duration:.1f} s, so the file has no segment"
                for kind in ("transcriptions", "tokens"):
                    store.write_record(kind, Failure(id=f.id, stage="quality", error=error, source=f.source))
            done += 1
            seconds += listing.duration
    return StageReport(stage="segment", shard=index, files=len(files), done=done, reused=reused, failed=failed,
                       audio_seconds=seconds)


# -- Prefect task ------------------------------------------------------------------------------
from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402


@task(name="segment-long", task_run_name="segment-long-{index}", retries=1, retry_delay_seconds=5,
      cache_policy=NO_CACHE)
def segment_task(plan: str, index: int, settings: PipelineSettings) -> StageReport:
    """Segment the long files of segment task `index` of the run plan at `plan`."""
    from tasks.long_plan import load_segment_task
    from tasks.plan import load_plan

    run = load_plan(plan)
    files = load_segment_task(plan, index).files
    return segment_files(files, settings.segmentation, Store(settings.results_root), run.provenance.run_id, index)

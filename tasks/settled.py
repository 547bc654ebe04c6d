"""Folders a rerun can leave alone: nothing it would write there differs from what is stored.

Issue 11 asks a rerun that adds 10 files to 100,000 to take a minute. With per-file reuse alone it
still submitted every shard's two tasks and every merge (263 task runs over 100k files, 88 s), each
of which found nothing to do; Prefect's own cost per submitted task (~0.1 s in the flow process,
measured) is most of that. So the planner asks each folder first, in the flow process, from what
a merge already keeps (`tasks.folder_index`): the folder's slim index, read once, and two stat calls.

A folder is settled when its last merge (the index's `MergeStamp`) wrote it from exactly the ids
discovered now, with the output options asked now, with no failed file; the slim index vouches for
both stages of every file under this run's provenance (so a changed file, model, decode option,
language or tokeniser setting unsettles it); and the JSONL and errors file are as that merge left
them (size and modification stamp: an edited or deleted output is merged again). Merging it again
would write the same bytes, so it gets no shard task and no merge; its report comes from the stamp.

A folder with long recordings (issue 22) is asked the same about its lines: each long file stands
for the segments of its stored segment list (one read each), which must exist for this version of
the file and this segmentation fingerprint. So a changed cutting option unsettles only folders with
long files, and a changed `segment_over_s` or `no_segment` that turns a file whole (or long) changes
the folder's line ids, which unsettles it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tasks.folder_index import LoadedIndex, MergeStamp, OutputStat
from tasks.long_plan import line_files
from tasks.records import AudioFile, FolderReport, OutputOptions, Provenance, source_id, split_segment_id
from tasks.settings import SegmentOptions
from tasks.storage import Store, errors_name, jsonl_name


def ids_sha256(ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for file_id in sorted(ids):
        h.update(file_id.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def output_stat(store: Store, relative: str) -> OutputStat | None:
    found = store.stat(relative)
    return OutputStat(size=found[0], modified=found[1]) if found is not None else None


def merge_stamp(
    store: Store, folder: str, files: list[AudioFile], report: FolderReport, output: OutputOptions
) -> MergeStamp | None:
    """The stamp a merge that just wrote `report` from `files` (line ids: a long file's segments)
    leaves in the index; None when a file failed (a failed file is retried by every run, so such
    a folder is never settled)."""
    if any(e.stage != "quality" for e in report.errors) or report.files != len({source_id(f.id) for f in files}):
        return None
    return MergeStamp(
        ids_sha256=ids_sha256(f.id for f in files), output=output, lines=report.lines,
        audio_seconds=report.audio_seconds, flagged=report.flagged, worst=report.worst,
        dropped=report.errors, jsonl=output_stat(store, jsonl_name(folder)),
        errors_jsonl=output_stat(store, errors_name(folder)), segments=report.segments,
        segment_seconds=report.segment_seconds, segment_durations=report.segment_durations,
    )


def settled_report(
    store: Store, folder: str, files: list[AudioFile], index: LoadedIndex, expect: Provenance,
    output: OutputOptions, settings_hash: str, long_ids: set[str] | frozenset[str] = frozenset(),
    segmentation: SegmentOptions | None = None,
) -> FolderReport | None:
    """The report a merge of `folder` would give, when it would change nothing; else None.

    `files`: the folder's audio files as discovered now; `long_ids`: those to be segmented with
    `segmentation` (`tasks.long_plan.long_duration`).
    """
    stamp = index.index.merged
    if stamp is None or stamp.output != output:
        return None
    lines = files
    if long_ids:
        found = line_files(files, set(long_ids), store, segmentation or SegmentOptions())
        if found is None:
            return None
        lines = found
        segments = {f.id for f in lines if split_segment_id(f.id) is not None}
        if stamp.segments != len(segments - {e.id for e in stamp.dropped}):  # also: a stamp from before segments
            return None
    if stamp.ids_sha256 != ids_sha256(f.id for f in lines):
        return None
    for f in lines:
        if not (index.vouches("transcriptions", f, expect) and index.vouches("tokens", f, expect, settings_hash)):
            return None
    if output_stat(store, jsonl_name(folder)) != stamp.jsonl:
        return None
    if output_stat(store, errors_name(folder)) != stamp.errors_jsonl:
        return None
    return FolderReport(
        folder=folder, files=len(files), lines=stamp.lines, errors=list(stamp.dropped),
        audio_seconds=stamp.audio_seconds, changed=False, jsonl=store.display(jsonl_name(folder)),
        errors_jsonl=store.display(errors_name(folder)) if stamp.dropped else None,
        new=0, flagged=stamp.flagged, worst=list(stamp.worst), segments=stamp.segments,
        segment_seconds=stamp.segment_seconds, segment_durations=list(stamp.segment_durations),
    )

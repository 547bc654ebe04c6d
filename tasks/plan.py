"""The run plan: decided once at the edge, written to storage, passed to tasks by reference.

Prefect stores every flow-run parameter (and refuses more than 524,288 bytes of them) and ships
every task's arguments through Dask, so nothing that grows with the corpus may travel that way
(issue 11: a list of ids broke at ~3,000 files). Discovery writes, under the results root:

    _runs/{run_id}/plan.json            RunPlan: settings (no secrets), provenance, counts, groups
    _runs/{run_id}/shards/00000.json    Shard: batches of AudioFile with source size/mtime
    _runs/{run_id}/groups/00000.json    GroupPlan: a merge task's folders and their discovery errors
    _runs/{run_id}/refused.jsonl        ids refused because their folder cannot be written

and tasks receive `(plan location, index)`. Folders unchanged since their last merge are in no
shard and no group (`tasks.settled`); the plan counts them. Older runs' plans are pruned (the last
few are kept for inspection).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections import defaultdict
from typing import Any, NamedTuple

import fsspec
from pydantic import BaseModel, Field

from tasks.discover import Listing, ShardPacker, group_folders, scan_audio, shard_target, to_audio_file
from tasks.folder_index import LoadedIndex, index_path, parse_index
from tasks.long_plan import LongPacker, expand, load_long_shard, long_duration, segment_options
from tasks.provenance import settings_sha256
from tasks.records import (
    AudioFile,
    Batch,
    FileError,
    FolderReport,
    OutputOptions,
    Provenance,
    Record,
    Shard,
    folder_of,
)
from tasks.settled import settled_report
from tasks.settings import PipelineSettings
from tasks.storage import Store

logger = logging.getLogger(__name__)

RUNS_DIR = "_runs"
KEEP_RUNS = 5  # older plans are deleted at the start of a run
INDEX_READS = 64  # folders whose slim indexes are read in one bulk call while planning
RUN_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


class GroupRef(Record):
    """One merge task: which shards it waits for (folders live in `groups/{index}.json`)."""

    index: int
    label: str  # "p225" or "p225-to-p240": the merge task's name
    shards: list[int]
    folders: int
    files: int


class GroupPlan(Record):
    index: int
    folders: list[str]
    errors: list[FileError]  # discovery errors of these folders


class RunPlan(Record):
    """What every task of one run agrees on; O(groups + shards) in size, not O(files)."""

    run_id: str
    location: str  # the run's folder (path or URL); tasks get it plus an index
    audio_root: str
    results_root: str
    settings: dict[str, Any]  # PipelineSettings without secrets, for the record
    provenance: Provenance
    model: str | None
    files: int
    folders: int
    shards: int
    groups: list[GroupRef]
    refused: int  # ids refused at discovery whose folder cannot be written (refused.jsonl)
    settled_folders: int = 0  # unchanged since their last merge: no task (`tasks.settled`)
    settled_files: int = 0
    # Long recordings (`tasks.long_plan`): VAD tasks, and the shards holding time ranges of long
    # files with the VAD tasks each must wait for.
    segment_tasks: int = 0
    long_shards: dict[int, list[int]] = Field(default_factory=dict)
    long_files: int = 0
    long_seconds: float = 0.0


def new_run_id(flow_run_id: str | None = None) -> str:
    """Sortable by time, unique: `20261201T214800Z-1a2b3c4d` (the Prefect flow run's id when there is one)."""
    suffix = (flow_run_id or uuid.uuid4().hex).replace("-", "")[:8]
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{suffix}"


def public_settings(settings: PipelineSettings) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude={"service_token"})


class Planned(NamedTuple):
    plan: RunPlan
    refused: list[FileError]  # ids refused at discovery (for the summary)
    settled: list[FolderReport]  # folders left alone: their reports, as their last merge wrote them


def build_plan(
    settings: PipelineSettings, provenance: Provenance, model: str | None, n_workers: int, run_id: str,
    listing: Listing | None = None,
) -> Planned:
    """List the audio root and write the plan of what is left to do.

    Folders unchanged since their last merge (`tasks.settled`) get no shard and no merge: a rerun
    costs O(folders) reads here plus the work on what changed. Shards are written as they fill,
    so the flow process holds one folder and one shard of AudioFile records at a time plus a
    compact tuple per file.

    Raises:
        FileNotFoundError: the audio root does not exist.
    """
    fs, _ = fsspec.url_to_fs(settings.audio_root)
    listing = listing or scan_audio(settings.audio_root, settings.extensions, verify_content=settings.verify_content)
    store = Store(settings.results_root)
    run_dir = f"{RUNS_DIR}/{run_id}"
    location = store.display(run_dir)

    by_folder: dict[str, list] = defaultdict(list)
    for f in listing.files:
        by_folder[folder_of(f.id)].append(f)
    errors_by_folder: dict[str, list[FileError]] = defaultdict(list)
    for e in listing.errors:
        errors_by_folder[folder_of(e.id)].append(e)

    packer = ShardPacker(shard_target(len(listing.files), n_workers, settings.shard_max_files))
    shards_of: dict[str, set[int]] = defaultdict(set)

    def write(shards: list[Shard]) -> None:
        for shard in shards:
            store.write_bytes(f"{run_dir}/shards/{shard.index:05d}.json", shard.model_dump_json().encode())
            for batch in shard.batches:
                shards_of[batch.folder].add(shard.index)

    counts: dict[str, int] = {}
    settled: list[FolderReport] = []
    output = OutputOptions(with_quality=settings.with_quality, drop_flagged=settings.drop_flagged)
    settings_hash = settings_sha256(provenance.tokenizer_settings)
    names = sorted(by_folder)
    long_files: list[tuple[AudioFile, float]] = []
    for start in range(0, len(names), INDEX_READS):
        chunk_names = names[start : start + INDEX_READS]
        indexes = read_indexes(store, [n for n in chunk_names if n not in errors_by_folder])
        for folder in chunk_names:
            files = [to_audio_file(listing, fs, f) for f in by_folder.pop(folder)]
            durations = {f.id: d for f in files if (d := long_duration(f, settings.segmentation)) is not None}
            if folder in indexes:  # long files: their stored segment lists decide (`tasks.settled`)
                report = settled_report(store, folder, files, indexes[folder], provenance, output, settings_hash,
                                        set(durations), settings.segmentation)
                if report is not None:
                    settled.append(report)
                    continue
            counts[folder] = len(files)
            long_files += [(f, durations[f.id]) for f in files if f.id in durations]
            short = [f for f in files if f.id not in durations]
            for first in range(0, len(short), settings.batch_size):
                batch = Batch.model_construct(folder=folder, files=short[first : first + settings.batch_size])
                write(packer.add(batch))
    write(packer.close())
    longs = LongPacker(store, run_dir, first_shard=packer.count)
    for f, duration in long_files:
        write(longs.add(f, duration))
    write(longs.close())

    folders = sorted(set(shards_of) | set(errors_by_folder))
    groups: list[GroupRef] = []
    for index, names in enumerate(group_folders(folders, settings.merge_max_tasks)):
        group = GroupPlan(index=index, folders=names, errors=[e for n in names for e in errors_by_folder[n]])
        store.write_bytes(f"{run_dir}/groups/{index:05d}.json", group.model_dump_json().encode())
        shard_ids = sorted({i for n in names for i in shards_of[n]})
        label = names[0] if len(names) == 1 else f"{names[0]}-to-{names[-1]}"
        groups.append(GroupRef(index=index, label=label, shards=shard_ids, folders=len(names),
                               files=sum(counts.get(n, 0) for n in names)))
    if listing.refused:
        store.write_lines(f"{run_dir}/refused.jsonl", listing.refused)
    plan = RunPlan(
        run_id=run_id, location=location, audio_root=settings.audio_root, results_root=settings.results_root,
        settings=public_settings(settings), provenance=provenance, model=model,
        files=len(listing.files), folders=len(folders) + len(settled), shards=longs.next_shard, groups=groups,
        refused=len(listing.refused), settled_folders=len(settled), settled_files=sum(r.files for r in settled),
        segment_tasks=longs.segment_tasks, long_shards=longs.shards, long_files=longs.files,
        long_seconds=round(longs.seconds, 3),
    )
    store.write_bytes(f"{run_dir}/plan.json", plan.model_dump_json(indent=1).encode())
    return Planned(plan, listing.refused, settled)


def read_indexes(store: Store, folders: list[str]) -> dict[str, LoadedIndex]:
    """The slim indexes of `folders` in one bulk read (concurrent GETs on object stores)."""
    blobs = store.read_many([index_path(folder) for folder in folders])
    return {folder: parse_index(folder, raw) for folder, raw in zip(folders, blobs, strict=True)}


def prune_runs(results_root: str, keep: int = KEEP_RUNS, current: str | None = None) -> list[str]:
    """Delete all but the newest `keep` run plans (never `current`); returns the removed run ids."""
    store = Store(results_root)
    base = store.path(RUNS_DIR)
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(base, detail=False))
    except FileNotFoundError:
        return []
    runs = [n for n in names if RUN_ID.match(n) and n != current]
    removed = runs[: max(0, len(runs) - keep)]
    for name in removed:
        store.fs.rm(f"{base}/{name}", recursive=True)
    return removed


# -- reading a plan back (in tasks) ----------------------------------------------------------------


def _read(location: str, relative: str, model: type[BaseModel]):
    data = Store(location).read_bytes(relative)
    if data is None:
        raise FileNotFoundError(f"run plan file missing: {location}/{relative} (deleted while the run was going?)")
    return model.model_validate_json(data)


def load_plan(location: str) -> RunPlan:
    return _read(location, "plan.json", RunPlan)


def load_shard(location: str, index: int) -> Shard:
    return _read(location, f"shards/{index:05d}.json", Shard)


def load_group(location: str, index: int) -> GroupPlan:
    return _read(location, f"groups/{index:05d}.json", GroupPlan)


def group_files(plan: RunPlan, group: GroupPlan) -> tuple[dict[str, list[AudioFile]], dict[str, list[int]]]:
    """The group's files by folder (from its shards, in id order) and the shards each folder is in."""
    wanted = set(group.folders)
    files: dict[str, list[AudioFile]] = {folder: [] for folder in group.folders}
    shards: dict[str, list[int]] = defaultdict(list)
    long_items = []
    for index in plan.groups[group.index].shards:
        if index in plan.long_shards and (long := load_long_shard(plan.location, index)) is not None:
            long_items += long.items
        for batch in load_shard(plan.location, index).batches:
            if batch.folder in wanted:
                files[batch.folder].extend(batch.files)
                if index not in shards[batch.folder]:
                    shards[batch.folder].append(index)
    if long_items:  # long files become their segments (one line each), whatever shard cut them
        store, options = Store(plan.results_root), segment_options(plan.settings)
        for folder in files:
            unique = list({f.id: f for f in files[folder]}.values())
            files[folder] = expand(unique, long_items, store, options, whole=True)[0]
    return files, dict(shards)


def tokeniser_settings(settings: PipelineSettings) -> dict[str, Any]:
    """The tokeniser's settings as intermediates store them, validated in this process.

    A bad name or option is one clear error here, before any cluster starts, not a failure on
    every worker. rpq and simulated describe themselves from their options (no torch in the
    flow process); encodec is built on CPU (the device changes no token).

    Raises:
        ValueError: unknown tokeniser or option, or a value it refuses.
        ImportError: its optional package is missing.
    """
    from tasks.tokenisers import tokeniser_settings as settings_of

    return json.loads(json.dumps(settings_of(settings.tokenizer, **settings.tokenizer_options)))  # tuples -> lists

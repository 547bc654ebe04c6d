"""The export engine every format shares: plan shards, write each atomically, skip finished ones.

Two streaming passes over the JSONL. The first plans: it cuts the line stream into shards (a
shard closes at `samples` lines or when the next line would take it past `bytes`) and hashes
each shard's lines. The second writes: a shard whose index file (`.export/shard-NNNNNN.json`)
records the same lines, the same options and whose files all exist is skipped; any other is
written to temp files beside its targets, renamed into place, and only then gets its index. So a
killed export leaves finished shards and temps (no torn shard under a final name), and a rerun
redoes exactly the unfinished or changed shards. `export.json`, written last, sums it all up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from tasks.export.reader import INT64_LIMIT, BadLine, Sample, iter_lines
from tasks.manifest import MANIFEST_NAME, Manifest
from tasks.storage import TEMP_PREFIX, TEMP_SUFFIX, Store

INDEX_DIR = ".export"
SUMMARY_NAME = "export.json"
ERRORS_NAME = "export.errors.jsonl"
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ExportError(ValueError):
    """The export cannot start: no results, a bad option, an unusable output directory."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LineError(_Model):
    """A line that has no sample in the export, and why (the export's `export.errors.jsonl`)."""

    id: str
    error: str


class ShardIndex(_Model):
    """Written after a shard's files are in place: its presence means the shard is complete."""

    index: int
    lines: int  # JSONL lines this shard covers: samples + errors
    samples: int
    sha256: str  # of the covered lines' bytes (and audio sizes when audio is embedded)
    options: str  # fingerprint of the export options the shard was written with
    files: list[str]
    first_id: str
    last_id: str
    errors: list[LineError] = Field(default_factory=list)


class ExportReport(_Model):
    format: str
    out: str
    lines: int  # every JSONL line seen
    samples: int  # lines exported
    failed: int  # lines not exported (listed in export.errors.jsonl)
    shards: int
    reused_shards: int
    files: list[str]  # every shard file, relative to out
    manifest: bool  # whether the results root had a manifest (copied into out)
    wall_seconds: float
    errors: list[LineError] = Field(default_factory=list)


@dataclass(frozen=True)
class ShardLimit:
    samples: int | None = None
    bytes: int | None = None


def parse_shard_size(text: str) -> ShardLimit:
    """`"1000"` -> 1000 samples per shard; `"500MB"`, `"1GiB"` -> a byte bound.

    Raises:
        ExportError: neither a positive integer nor a size with a unit (B, KB, MB, GB, KiB, MiB, GiB).
    """
    value = text.strip().lower().replace(" ", "")
    if value.isdigit() and int(value) > 0:
        return ShardLimit(samples=int(value))
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]i?b|b)", value)
    if not match or float(match.group(1)) <= 0:
        raise ExportError(f"--shard-size {text!r}: give samples (e.g. 1000) or bytes with a unit (e.g. 500MB, 1GiB)")
    return ShardLimit(bytes=int(float(match.group(1)) * _UNITS[match.group(2)]))


class Writer(Protocol):
    """One format. `write_shard` writes `files(index)` (as the temp paths it is handed)."""

    name: str

    def options(self) -> dict: ...  # what changes the output (fingerprinted into every shard index)

    def files(self, index: int) -> list[str]: ...  # paths relative to the export directory

    def size_of(self, sample: Sample) -> int: ...  # an upper bound of the bytes it adds to a shard

    def shard_overhead(self) -> int: ...  # bytes a shard takes with no sample in it

    def hash_extra(self, sample: Sample) -> bytes: ...  # e.g. the audio size, when audio is embedded

    def write_shard(self, index: int, samples: Iterator[Sample], targets: dict[str, str]) -> list[LineError]: ...

    def finish(self, out: Path, report: ExportReport) -> None: ...  # files beside the shards (READMEs)


@dataclass
class _Plan:
    index: int
    lines: int = 0
    samples: int = 0
    size: int = 0
    sha256: str = ""
    first_id: str = ""
    last_id: str = ""


def run_export(
    results_root: str, out: str, writer: Writer, limit: ShardLimit, manifest: Manifest | None,
    progress: Callable[[str], None] = lambda _: None,
) -> ExportReport:
    """Export every line of `results_root` into `out` with `writer`; see the module docstring."""
    started = time.monotonic()
    out_dir = Path(out)
    if "://" in out:
        raise ExportError(f"--out {out!r}: exports are written to a local directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out!r} exists and is not a directory")
    (out_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    for leftover in Store(str(out_dir)).sweep_stale_temps():  # from a killed export, over an hour old
        progress(f"removed {leftover}, a temp file an earlier export was killed while writing")
    # Tokens at or past the codebook size are bad lines (reader.parse_line); the bound is an
    # option, since a different manifest makes the same lines into different shards.
    token_limit = manifest.tokeniser.codebook_size if manifest is not None else INT64_LIMIT
    options = _fingerprint({"format": writer.name, **writer.options(), "limit": [limit.samples, limit.bytes],
                            "token_limit": token_limit})

    plan = _plan(iter_lines(results_root, token_limit), writer, limit)
    stream = iter_lines(results_root, token_limit)
    indexes: list[ShardIndex] = []
    reused = 0
    for shard in plan:
        done = _read_index(out_dir, shard.index)
        if done is not None and _complete(out_dir, done, shard, options):
            _consume(stream, shard.lines)
            indexes.append(done)
            reused += 1
            progress(f"shard {shard.index} already complete ({done.samples} samples), kept")
            continue
        indexes.append(_write(out_dir, writer, shard, islice(stream, shard.lines), options))
        progress(f"shard {shard.index} written ({indexes[-1].samples} samples)")
    _remove_stale(out_dir, writer, len(plan))

    errors = [e for i in indexes for e in i.errors]
    report = ExportReport(
        format=writer.name, out=str(out_dir.resolve()), lines=sum(i.lines for i in indexes),
        samples=sum(i.samples for i in indexes), failed=len(errors), shards=len(indexes), reused_shards=reused,
        files=[f for i in indexes for f in i.files], manifest=manifest is not None,
        wall_seconds=time.monotonic() - started, errors=errors[:100],
    )
    store = Store(str(out_dir))
    if manifest is not None:
        store.write_bytes(MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())
    store.write_bytes(ERRORS_NAME, "".join(e.model_dump_json() + "\n" for e in errors).encode())
    writer.finish(out_dir, report)
    store.write_bytes(SUMMARY_NAME, (report.model_dump_json(indent=2) + "\n").encode())
    return report


def _plan(lines: Iterator[Sample | BadLine], writer: Writer, limit: ShardLimit) -> list[_Plan]:
    """Shard boundaries and per-shard hashes, one small record per shard."""
    plans: list[_Plan] = []
    current, digest = _Plan(index=0, size=writer.shard_overhead()), hashlib.sha256()
    for line in lines:
        size = writer.size_of(line) if isinstance(line, Sample) else 0
        full = current.samples and (
            (limit.samples is not None and current.samples >= limit.samples)
            or (limit.bytes is not None and current.size + size > limit.bytes)
        )
        if full:
            current.sha256 = digest.hexdigest()
            plans.append(current)
            current, digest = _Plan(index=len(plans), size=writer.shard_overhead()), hashlib.sha256()
        _hash_line(digest, line, writer)
        current.lines += 1
        current.samples += isinstance(line, Sample)
        current.size += size
        current.first_id = current.first_id or line.id
        current.last_id = line.id
    if current.lines:
        current.sha256 = digest.hexdigest()
        plans.append(current)
    return plans


def _hash_line(digest: hashlib._Hash, line: Sample | BadLine, writer: Writer) -> None:
    digest.update(line.raw)
    digest.update(b"\n")
    if isinstance(line, Sample):
        digest.update(writer.hash_extra(line))


def _complete(out_dir: Path, done: ShardIndex, shard: _Plan, options: str) -> bool:
    return (
        done.options == options and done.sha256 == shard.sha256 and done.lines == shard.lines
        and all((out_dir / f).is_file() for f in done.files)
    )


def _consume(stream: Iterator, n: int) -> None:
    for _ in islice(stream, n):
        pass


def _write(out_dir: Path, writer: Writer, shard: _Plan, lines: Iterator[Sample | BadLine], options: str) -> ShardIndex:
    """Write one shard to temps, rename them into place, then its index (see module docstring)."""
    _index_path(out_dir, shard.index).unlink(missing_ok=True)  # incomplete from here until the end
    files = writer.files(shard.index)
    targets = {f: _temp_beside(out_dir / f) for f in files}
    digest = hashlib.sha256()
    bad: list[LineError] = []
    counted = {"lines": 0}

    def samples() -> Iterator[Sample]:
        for line in lines:
            counted["lines"] += 1
            _hash_line(digest, line, writer)
            if isinstance(line, BadLine):
                bad.append(LineError(id=line.id, error=line.error))
            else:
                yield line

    try:
        feed = samples()
        errors = writer.write_shard(shard.index, feed, targets)
        _consume(feed, shard.lines)  # a writer that stopped early must not shift the next shard
        for f, tmp in targets.items():
            _fsync(tmp)
            os.replace(tmp, out_dir / f)
    finally:
        for tmp in targets.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    all_errors = bad + errors
    index = ShardIndex(
        index=shard.index, lines=counted["lines"], samples=counted["lines"] - len(all_errors),
        sha256=digest.hexdigest(), options=options, files=files, first_id=shard.first_id,
        last_id=shard.last_id, errors=all_errors,
    )
    Store(str(out_dir)).write_bytes(_index_name(shard.index), index.model_dump_json().encode())
    return index


def _remove_stale(out_dir: Path, writer: Writer, n_shards: int) -> None:
    """Shards past the last one (the corpus shrank since an earlier export): index first."""
    for path in sorted((out_dir / INDEX_DIR).glob("shard-*.json")):
        match = re.fullmatch(r"shard-(\d+)\.json", path.name)
        if match and int(match.group(1)) >= n_shards:
            stale = _read_index(out_dir, int(match.group(1)))
            path.unlink(missing_ok=True)
            for f in stale.files if stale else writer.files(int(match.group(1))):
                (out_dir / f).unlink(missing_ok=True)


def _index_name(index: int) -> str:
    return f"{INDEX_DIR}/shard-{index:06d}.json"


def _index_path(out_dir: Path, index: int) -> Path:
    return out_dir / _index_name(index)


def _read_index(out_dir: Path, index: int) -> ShardIndex | None:
    try:
        return ShardIndex.model_validate_json(_index_path(out_dir, index).read_bytes())
    except (FileNotFoundError, ValueError):
        return None  # absent or torn: the shard is redone


def _temp_beside(target: Path) -> str:
    """A temp file for a writer to stream a shard into (Store.write_bytes wants the bytes whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would survive the rename: exports are for others to read
    os.close(fd)
    return tmp


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fingerprint(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]

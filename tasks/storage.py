"""Results storage on fsspec: intermediates keyed by input path, atomic writes, folder locks.

Layout of a results root (every name a folder's outputs can take is listed, so none collide):
- `{folder}.jsonl`: the folder's lines (the product's contract);
- `{folder}.errors.jsonl`: one line per failed file. A folder whose last name ends in `.errors`
  would write its JSONL onto folder `x`'s errors file, so such folders are refused
  (`output_name_problem`): with that rule no JSONL, errors file or index can share a name;
- `transcriptions/{stem}.json`, `tokens/{stem}.json`: one intermediate per file and stage;
- `.index/{folder}.json`: the folder's slim index (provenance only) and `.index/{folder}.content.records`
  its records (`tasks.folder_index`); under a hidden folder, so no speaker folder's output lands
  there, and the two differ in their last suffix (`.json`, `.jsonl`), so no two folders' collide;
- `.locks/`: folder lock files (local results roots only).

Everything else the product keeps there is internal (`INTERNAL_DIRS`, `INTERNAL_FILES`): run plans
(`_runs/`), report images (`_report/`), `_owner.json`, `manifest.json`, the run-level
`_refused.errors.jsonl`. `output_of` is the one rule every reader asks "is this file a folder's
results?": only `{folder}.jsonl` / `{folder}.errors.jsonl` outside those names, never a hidden or
temp file. Discovery refuses the folders whose outputs would land among them (`reserved_problem`).

Atomicity: on a local disk every write goes to a temp file in the same directory, is fsynced
and renamed over the target (POSIX rename is atomic), so a reader sees the old complete file or
the new complete one, never a torn one. On object stores (s3, gcs, azure, memory) a single PUT
is already atomic: the object appears whole or not at all, so we write the object directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal, NamedTuple

import fsspec
from filelock import FileLock
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ValidationError

from tasks.records import Failure, Tokens, Transcription, split_segment_id

ERRORS_SUFFIX = ".errors"

Kind = Literal["transcriptions", "tokens"]
INTERMEDIATE_KINDS = ("transcriptions", "tokens")  # top-level folders of intermediates
# Every top-level folder the product writes for itself (a new one must be added here: the walk in
# tests/reliability/test_reruns.py fails on any file that is neither a result nor internal).
# `segments`: long-recording intermediates; `_runs`: run plans (`tasks.plan.RUNS_DIR`); `_report`:
# report images (`flows.artifacts.REPORT_DIR`); `.index`, `.locks`: folder indexes and locks.
INTERNAL_DIRS = frozenset({*INTERMEDIATE_KINDS, "segments", "_runs", "_report", ".index", ".locks"})
REFUSED_ERRORS = "_refused.errors.jsonl"  # files refused at discovery whose folder cannot be written
INTERNAL_FILES = frozenset({"_owner.json", "manifest.json", REFUSED_ERRORS})
OutputKind = Literal["lines", "errors"]
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".part"
_ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gcs", "gs", "az", "abfs", "abfss", "memory"}


class _Unknown:
    """The default of `old_digest`: not known, read it."""


UNKNOWN = _Unknown()
_CHUNK = 1 << 16  # bytes per read when hashing a stored file


class StreamWriter:
    """What `Store.stream_if_changed` hands out: `write` pieces; the sha256 is kept as they pass."""

    def __init__(self, file: BinaryIO, old_digest: str | None | _Unknown = UNKNOWN) -> None:
        self._file = file
        self.old_digest = old_digest
        self._hash = hashlib.sha256()
        self.size = 0
        self.changed = False

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def read_source(path: str, storage_options: dict | None = None) -> bytes:
    """The bytes of one audio file, from a local path or any fsspec URL."""
    fs, stripped = fsspec.url_to_fs(path, **(storage_options or {}))
    return fs.cat_file(stripped)


class Output(NamedTuple):
    """A file under the results root that is a folder's output."""

    folder: str
    kind: OutputKind


def output_of(relative: str) -> Output | None:
    """The folder output `relative` (a path under the results root) is, or None: anything internal,
    hidden, temporary or not named like an output is no folder's result, whatever its suffix."""
    segments = relative.split("/")
    if any(not s or s.startswith(".") for s in segments) or relative in INTERNAL_FILES:
        return None
    if len(segments) > 1 and segments[0] in INTERNAL_DIRS:
        return None
    if not relative.isprintable():
        return None  # discovery refuses such folders: no output of ours has this name
    if relative.endswith(ERRORS_SUFFIX + ".jsonl"):
        return Output(relative[: -len(ERRORS_SUFFIX + ".jsonl")], "errors")
    if relative.endswith(".jsonl"):
        return Output(relative[: -len(".jsonl")], "lines")
    return None


def is_internal(relative: str) -> bool:
    """A file the product keeps for itself under the results root: in an internal folder, an
    internal file, hidden, or a temp file of a write in progress (`.tmp-*.part`, `{target}.tmp-*`)."""
    segments = relative.split("/")
    return (
        (len(segments) > 1 and segments[0] in INTERNAL_DIRS) or relative in INTERNAL_FILES
        or any(s.startswith(".") for s in segments) or ".tmp-" in segments[-1]
    )


def reserved_problem(folder: str) -> str | None:
    """Why `folder`'s outputs would land among the results root's internal files, or None."""
    top, _, rest = folder.partition("/")
    if rest and top in INTERNAL_DIRS:
        return (f"its outputs would be written under {top}/, which the results root keeps for its own "
                "files; rename the folder")
    if {jsonl_name(folder), errors_name(folder)} & INTERNAL_FILES:
        return f"its outputs would overwrite the results root's own {errors_name(folder)}; rename the folder"
    return None


def stem_id(file_id: str) -> str:
    """`p225/p225_001_mic2.flac` -> `p225/p225_001_mic2`: intermediates mirror input paths.

    A segment's id keeps its fragment: `book/ch01.flac#t=1.000,2.500` -> `book/ch01#t=1.000,2.500`.
    """
    segment = split_segment_id(file_id)
    if segment is not None:
        return f"{stem_id(segment[0])}#t={segment[1]:.3f},{segment[2]:.3f}"
    return str(PurePosixPath(file_id).with_suffix(""))


class Store:
    """The results root: `{folder}.jsonl`, `{folder}.errors.jsonl`, `transcriptions/`, `tokens/`."""

    def __init__(self, results_root: str, storage_options: dict | None = None) -> None:
        self.fs, self.root = fsspec.url_to_fs(results_root, **(storage_options or {}))
        self.root = self.root.rstrip("/") or "/"
        self.url = results_root
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # One name per location: `results`, `./results`, `/abs/results` and a symlink to it are
        # one root, so they share folder locks; a URL keeps its protocol (s3://b/x, not b/x).
        self.canonical = os.path.realpath(self.root) if self.is_local else self.fs.unstrip_protocol(self.root)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def display(self, relative: str) -> str:
        """A path a user can paste: the local path, or the URL with its protocol."""
        full = self.path(relative)
        return full if self.is_local else self.fs.unstrip_protocol(full)

    def intermediate(self, kind: Kind, file_id: str) -> str:
        return f"{kind}/{stem_id(file_id)}.json"

    # -- writes --------------------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write `data` so that readers never observe a partial file (see module docstring)."""
        target = self.path(relative)
        if self.is_local:
            tmp = _durable_temp_beside(target, data)
            try:
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return
        self._put_atomically(target, lambda path: self.fs.pipe_file(path, data))

    def write_record(self, kind: Kind, record: BaseModel) -> None:
        self.write_bytes(self.intermediate(kind, record.id), record.model_dump_json().encode())

    def write_lines(self, relative: str, records: list[BaseModel]) -> None:
        self.write_bytes(relative, _jsonl(records))

    def write_lines_if_changed(
        self, relative: str, records: list[BaseModel], stored: bytes | None | _Unknown = UNKNOWN
    ) -> bool:
        """Write JSONL unless the stored file already holds exactly these lines; True if written.
        `stored`: the stored bytes when the caller read them already (None: absent)."""
        body = _jsonl(records)
        if (self.read_bytes(relative) if isinstance(stored, _Unknown) else stored) == body:
            return False
        self.write_bytes(relative, body)
        return True

    def remove(self, relative: str) -> bool:
        """Delete one file; True if there was one (so a caller can report a change)."""
        try:
            self.fs.rm_file(self.path(relative))
        except FileNotFoundError:
            return False
        return True

    @contextlib.contextmanager
    def stream_if_changed(self, relative: str, old_digest: str | None | _Unknown = UNKNOWN) -> Iterator[StreamWriter]:
        """Write a file of any size in pieces (`writer.write`), as atomically as `write_bytes`,
        holding none of it in memory; it replaces the stored file only if its content differs
        (`writer.changed` says whether it did). An exception inside the block writes nothing.

        The bytes go to a temp file (beside the target on a local disk, renamed over it; in the
        local temp dir for a remote root, then uploaded in one atomic PUT, multipart for a large
        one). `old_digest` (or `writer.old_digest`, set before the block ends): the stored
        file's sha256 when the caller streams it anyway (None: absent); by default it is read
        here, streamed.
        """
        target = self.path(relative)
        directory = os.path.dirname(target) if self.is_local else None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                writer = StreamWriter(f, old_digest)
                yield writer
                f.flush()
                if self.is_local:
                    os.fchmod(f.fileno(), 0o666 & ~_umask())  # as `write_bytes` does
                    os.fsync(f.fileno())
            stored = self.digest(relative) if isinstance(writer.old_digest, _Unknown) else writer.old_digest
            if stored == writer.hexdigest():
                return
            if self.is_local:
                os.replace(tmp, target)
            else:
                self._upload(tmp, target)
            writer.changed = True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _upload(self, local: str, target: str) -> None:
        self._put_atomically(target, lambda path: self.fs.put_file(local, path))

    def _put_atomically(self, target: str, put: Callable[[str], object]) -> None:
        """`put(path)` so readers see the old object or the new one: a single PUT where the store
        makes PUTs atomic, else a PUT to a temp name moved over the target."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if protocols & _ATOMIC_PUT_PROTOCOLS:
            put(target)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        put(tmp)
        self.fs.mv(tmp, target)

    def sweep_stale_temps(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete temp files a killed writer left behind; returns their paths.

        Only on a local disk (object-store PUTs leave none). A temp younger than `older_than_s`
        may belong to a run still writing beside this one, so it is left alone.
        """
        if not self.is_local or not os.path.isdir(self.root):
            return []
        cutoff = time.time() - older_than_s
        swept = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                if not (name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)):
                    continue
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_mtime < cutoff:
                        os.unlink(path)
                        swept.append(path)
        return swept

    # -- reads ---------------------------------------------------------------------------------
    def read_bytes(self, relative: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            return None

    def stat(self, relative: str) -> tuple[int, str] | None:
        """(size, last-modified as text) of a stored file, one request; None if it is absent.

        Local: the mtime in nanoseconds; object stores: the ETag or LastModified they report.
        """
        if self.is_local:
            try:
                st = os.stat(self.path(relative))
            except FileNotFoundError:
                return None
            return st.st_size, str(st.st_mtime_ns)
        try:
            info = self.fs.info(self.path(relative))
        except FileNotFoundError:
            return None
        modified = next((info[k] for k in ("ETag", "etag", "LastModified", "mtime", "created") if info.get(k)), "")
        return int(info.get("size") or 0), str(modified)

    def iter_lines(self, relative: str) -> Iterator[bytes]:
        """The stored file's lines (with their newline), streamed; none if it is absent."""
        try:
            f = self.fs.open(self.path(relative), "rb")
        except FileNotFoundError:
            return
        with f:
            yield from f

    def digest(self, relative: str) -> str | None:
        """sha256 of the stored file, streamed; None if it is absent."""
        try:
            f = self.fs.open(self.path(relative), "rb")
        except FileNotFoundError:
            return None
        h = hashlib.sha256()
        with f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def read_many(self, relatives: list[str]) -> list[bytes | None]:
        """Many files in one call (concurrent GETs on object stores); None where one is absent.

        `cat_ranges`, not `cat`: `cat` expands glob characters, and `[` is legal in a file name.

        Raises:
            OSError: any failure other than a missing file (a reader must not mistake an
                unreachable store for missing results).
        """
        if not relatives:
            return []
        out = self.fs.cat_ranges([self.path(r) for r in relatives], None, None, on_error="return")
        results: list[bytes | None] = []
        for relative, item in zip(relatives, out, strict=True):
            if isinstance(item, FileNotFoundError):
                results.append(None)
            elif isinstance(item, BaseException):
                raise OSError(f"cannot read {self.display(relative)}: {item}") from item
            else:
                results.append(item)
        return results

    def read_intermediates(self, kind: Kind, file_ids: list[str]) -> dict[str, Transcription | Tokens | Failure | None]:
        """The stored records of `file_ids` for one stage, read in one bulk call."""
        model = Transcription if kind == "transcriptions" else Tokens
        blobs = self.read_many([self.intermediate(kind, i) for i in file_ids])
        return {i: parse_intermediate(data, i, model) for i, data in zip(file_ids, blobs, strict=True)}

    def read_transcription(self, file_id: str) -> Transcription | Failure | None:
        return self._read_intermediate("transcriptions", file_id, Transcription)

    def read_tokens(self, file_id: str) -> Tokens | Failure | None:
        return self._read_intermediate("tokens", file_id, Tokens)

    def _read_intermediate(self, kind: Kind, file_id: str, model: type[BaseModel]):
        return parse_intermediate(self.read_bytes(self.intermediate(kind, file_id)), file_id, model)

    def outputs(self) -> Iterator[tuple[str, Output]]:
        """Every folder output under the root (`output_of`), as (relative path, output).

        Walks the results tree without descending into internal folders (the intermediates are
        two files per audio file: listing them would cost a million-file run minutes on an
        object store) or hidden ones.
        """
        if not self.fs.exists(self.root):
            return
        base = self.root.rstrip("/")
        for directory, dirs, files in self.fs.walk(self.root, topdown=True, detail=False):
            relative_dir = directory.rstrip("/")[len(base) + 1 :]
            dirs[:] = [d for d in dirs if not d.startswith(".") and (relative_dir or d not in INTERNAL_DIRS)]
            for name in files:
                relative = f"{relative_dir}/{name}".lstrip("/")
                output = output_of(relative)
                if output is not None:
                    yield relative, output

    def folders_with_results(self) -> set[str]:
        """Folders that have a `{folder}.jsonl` here (nested folders keep their slashes)."""
        return {output.folder for _, output in self.outputs() if output.kind == "lines"}

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Write `data` only if no file is there yet, atomically: True if this call created it.

        Local: the bytes go to a temp file that is hard-linked to the target (link fails if the
        target exists, and a reader never sees a partial file). S3: a conditional PUT
        (`If-None-Match: *`). Other stores: fsspec's create mode (the memory store's is atomic
        within a process; elsewhere it is check-then-write, the best that store offers).
        """
        target = self.path(relative)
        if not self.is_local:
            try:
                self.fs.pipe_file(target, data, mode="create")
            except FileExistsError:
                return False
            except TypeError:  # a filesystem whose pipe_file predates fsspec's `mode`
                if self.fs.exists(target):
                    return False
                self.fs.pipe_file(target, data)
            return True
        tmp = _durable_temp_beside(target, data)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True

    # -- locking -------------------------------------------------------------------------------
    def lock_path(self, folder: str) -> str:
        """The lock file of `folder`, keyed on the canonical root (`self.canonical`).

        It lives beside the results on a local disk; for a remote results root it lives in the
        local temp dir, so it guards runs on the same host only.
        """
        key = hashlib.sha1(f"{self.canonical}|{folder}".encode()).hexdigest()[:16]
        if self.is_local:
            lock_dir = os.path.join(self.canonical, ".locks")
        else:
            lock_dir = os.path.join(tempfile.gettempdir(), "audio-pipeline-locks")
        return os.path.join(lock_dir, f"{key}.lock")

    @contextlib.contextmanager
    def folder_lock(self, folder: str, timeout_s: float = 600.0) -> Iterator[None]:
        """Serialise merges of one folder across processes on this machine (see `lock_path`)."""
        path = self.lock_path(folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileLock(path, timeout=timeout_s):
            yield


def parse_intermediate(data: bytes | None, file_id: str, model: type[BaseModel]):
    """The record in `data` for `file_id`, or None if absent, unreadable or someone else's id."""
    if data is None:
        return None
    try:
        raw = json.loads(data)
        record = Failure.model_validate(raw) if raw.get("failed") else model.model_validate(raw)
    except (ValueError, ValidationError, AttributeError):
        return None  # torn by an older crash or foreign: treat as missing, it gets redone
    return record if record.id == file_id else None


def jsonl_name(folder: str) -> str:
    return f"{folder}.jsonl"


def errors_name(folder: str) -> str:
    return f"{folder}.errors.jsonl"


def output_name_problem(folder: str) -> str | None:
    """Why `folder` cannot have outputs in a results root, or None.

    A folder named `x.errors` would write `x.errors.jsonl`, which is folder `x`'s errors file.
    Discovery should refuse such folders; merge refuses them too, whoever calls it.
    """
    if folder.rsplit("/", 1)[-1].endswith(ERRORS_SUFFIX):
        return (
            f"folder name {folder!r} ends in {ERRORS_SUFFIX!r}: its JSONL would overwrite the errors file of "
            f"folder {folder[: -len(ERRORS_SUFFIX)]!r}; rename the folder"
        )
    return None


def _durable_temp_beside(target: str, data: bytes) -> str:
    """`data` in a new temp file in `target`'s folder (created if missing), fsynced; its path.

    mkstemp creates 0600 and a rename or link keeps it: results would be unreadable to anyone
    but their writer, so the file gets the mode a plain open() would (0666 minus umask).
    """
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it where Linux allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore, once per process
    os.umask(mask)
    return mask


def _jsonl(records: list[BaseModel]) -> bytes:
    return "".join(r.model_dump_json() + "\n" for r in records).encode()

"""List audio under a root (any fsspec URL), refuse unsafe ids, cut batches, pack shards.

Prefect costs ~0.1 s and one recorded task run per task (and its UI struggles past a few
thousand runs: prefect#8579, #12877, #16299), so a task takes a shard of many batches and the
number of shards grows with the corpus only up to `shard_max_files` per shard.

Listing is one bulk call on object stores (`find(detail=True)`: size and ETag/mtime come with
the listing, no request per file) and one `scandir` per directory on a local disk. Each file is
held as a small `Listed` tuple until `tasks.plan` packs it into a shard on storage.

An id is a path under the results root too (`transcriptions/{id}.json`, `{folder}.jsonl`), so
ids that could escape it or collide are refused here, each as an error of its own (issue 13):
`..`/`.`/empty segments, absolute paths, control characters, names that are not valid UTF-8,
folders named `*.errors` (their JSONL would be another folder's errors file), and folders whose
outputs would land among the results root's internal files (`tasks.storage.reserved_problem`).

A file's source identity (`SourceInfo`: what tells a changed file from an unchanged one) is its
size plus, on a local disk, its mtime in nanoseconds; on an object store, its ETag (and version id
where the store reports one), which changes with every PUT even within the same second, unlike
`LastModified`. With `verify_content` the sha256 of its bytes is added, for files rewritten in
place with their times preserved (every file is read at every run: opt-in).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import posixpath
import stat
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.records import ROOT_FOLDER, AudioFile, Batch, FileError, Shard, SourceInfo, folder_of, source_id
from tasks.storage import reserved_problem

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", "~")
ERRORS_SUFFIX = ".errors"  # `{folder}.errors.jsonl`: a folder named `x.errors` would write x's errors file

logger = logging.getLogger(__name__)


class Listed(NamedTuple):
    """One audio file as discovery holds it: ~200 bytes, not a pydantic model per file."""

    id: str
    size: int
    mtime: str
    sha256: str | None = None  # only with `verify_content`


class Listing(NamedTuple):
    """What discovery found: files sorted by id, errors per file, and ids refused for their folder."""

    root: str  # the root as the filesystem names it (no protocol)
    files: list[Listed]
    errors: list[FileError]  # belong to a folder that can be written: go to its errors file
    refused: list[FileError]  # their folder itself is unsafe: reported in the run summary only

    def path_of(self, fs: fsspec.AbstractFileSystem, file_id: str) -> str:
        full = f"{self.root.rstrip('/')}/{file_id}"
        return full if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(full)


def is_candidate(name: str, extensions: tuple[str, ...]) -> bool:
    """An audio file by suffix, and not a hidden or temp file still being written."""
    base = posixpath.basename(name)
    if base.startswith(".") or base.lower().endswith(_TEMP_SUFFIXES):
        return False
    return base.lower().endswith(extensions)


def printable_id(file_id: str) -> str:
    """The id as text that can be written to JSON and a terminal: bytes that are not UTF-8
    (surrogate-escaped by os.fsdecode) become `\\xe9`, control characters `\\x01`."""
    text = file_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


def id_problem(file_id: str) -> str | None:
    """Why `file_id` cannot name files under the results root, or None if it can."""
    if file_id.isascii() and file_id.isprintable() and "//" not in file_id and "/." not in file_id \
            and not file_id.startswith(("/", ".")) and not file_id.endswith("/"):
        return None  # the common case, decided in C: no control character, no '.'/'..'/empty segment
    try:
        file_id.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8 (rename the file or folder)"
    if file_id.startswith("/"):
        return "an absolute path, not a path under the audio root"
    segments = file_id.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return "a path with an empty, '.' or '..' segment could escape the results root"
    if any(unicodedata.category(c) == "Cc" for c in file_id):
        return "the name contains control characters (rename it)"
    return None


@functools.lru_cache(maxsize=4096)
def folder_problem(folder: str) -> str | None:
    """Why a folder's outputs cannot be written, or None if they can."""
    if folder == ROOT_FOLDER:
        return None
    why = id_problem(folder)
    if why:
        return f"its folder is refused: {why}"
    if folder.endswith(ERRORS_SUFFIX):
        other = folder[: -len(ERRORS_SUFFIX)]
        return (f"folder {folder!r} would write {folder}.jsonl, which is folder {other!r}'s errors "
                "file; rename the folder")
    return reserved_problem(folder)


def _stem(file_id: str) -> str:
    """`tasks.storage.stem_id` without pathlib (a million calls at discovery): `a/b.flac` -> `a/b`."""
    head, sep, base = file_id.rpartition("/")
    return head + sep + posixpath.splitext(base)[0]


def _mtime(info: dict) -> str:
    """The version part of a file's source identity, from a listing's or `info`'s details.

    Local: mtime in nanoseconds. Object stores: `etag:{ETag}` (plus `@{VersionId}`): a new PUT
    gets a new ETag even within the second that `LastModified` resolves. Else the time it reports.
    """
    if info.get("mtime_ns") is not None:
        return str(info["mtime_ns"])
    etag = next((info[k] for k in ("ETag", "etag", "md5Hash", "content_md5") if info.get(k)), None)
    if etag is not None:
        version = next((info[k] for k in ("VersionId", "version_id", "generation") if info.get(k)), None)
        return f"etag:{str(etag).strip(chr(34))}" + (f"@{version}" if version else "")
    for key in ("mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def content_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """sha256 of a file's bytes, streamed (`verify_content`)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def scan_audio(
    audio_root: str, extensions: tuple[str, ...], storage_options: dict | None = None, verify_content: bool = False
) -> Listing:
    """Every audio file under `audio_root`, sorted by id, plus what cannot be processed.

    With `verify_content`, each listed file is read and its sha256 joins its source identity.

    Raises:
        FileNotFoundError: the root itself does not exist or is not a directory.
    """
    fs, root = fsspec.url_to_fs(audio_root, **(storage_options or {}))
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise FileNotFoundError(f"audio root not found or not a directory: {audio_root}")
    files: list[Listed] = []
    errors: list[FileError] = []
    refused: list[FileError] = []
    by_stem: dict[str, str] = {}

    def refuse(file_id: str, why: str) -> None:
        error = FileError(id=printable_id(file_id), stage="discover", error=why)
        (refused if folder_problem(folder_of(file_id)) else errors).append(error)

    found = _find_local(root, extensions) if isinstance(fs, LocalFileSystem) else _find_remote(fs, root, extensions)
    for file_id, info in sorted(found, key=lambda item: item[0]):
        why = folder_problem(folder_of(file_id)) or id_problem(file_id)
        if why is None and info.get("type") not in (None, "file"):
            # Not silently dropped: a FIFO would hang a reader, a broken link has nothing to read.
            why = info.get("why") or "not a regular file"
        if why is None:
            stem = _stem(file_id)
            if stem in by_stem:
                # transcriptions/{stem}.json would hold two files' results: refuse, don't overwrite.
                why = f"same name as {by_stem[stem]} apart from the extension; rename one"
            else:
                by_stem[stem] = file_id
        if why is not None:
            refuse(file_id, why)
            continue
        digest = None
        if verify_content:
            try:
                digest = content_sha256(fs, f"{root.rstrip('/')}/{file_id}")
            except OSError as e:
                refuse(file_id, f"cannot read it to verify its content: {e}")
                continue
        files.append(Listed(file_id, int(info.get("size") or 0), _mtime(info), digest))
    return Listing(root=root, files=files, errors=errors, refused=refused)


def list_audio(
    audio_root: str, extensions: tuple[str, ...], storage_options: dict | None = None, verify_content: bool = False
) -> tuple[list[AudioFile], list[FileError]]:
    """`scan_audio` as AudioFile records (small corpora, tests); errors include refused ids."""
    fs, _ = fsspec.url_to_fs(audio_root, **(storage_options or {}))
    listing = scan_audio(audio_root, extensions, storage_options, verify_content)
    files = [to_audio_file(listing, fs, f) for f in listing.files]
    return files, sorted(listing.errors + listing.refused, key=lambda e: e.id)


def to_audio_file(listing: Listing, fs: fsspec.AbstractFileSystem, f: Listed) -> AudioFile:
    # model_construct: the values come from the filesystem; planning 1M files stays fast
    source = (SourceInfo.model_construct(size=f.size, mtime=f.mtime) if f.sha256 is None
              else SourceInfo.model_construct(size=f.size, mtime=f.mtime, sha256=f.sha256))
    return AudioFile.model_construct(id=f.id, path=listing.path_of(fs, f.id), source=source)


@dataclass(frozen=True)
class AudioRoot:
    """The audio root as merge asks it about ids a folder's last merge wrote but this run did not
    list: is the file still there (and which version), and why was it not listed."""

    url: str
    extensions: tuple[str, ...]
    verify_content: bool = False

    @functools.cached_property
    def _fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.url_to_fs(self.url)
        return fs, root.rstrip("/") or "/"

    def source_of(self, line_id: str) -> AudioFile | None:
        """The file as discovery would list it now (under `line_id`: a segment's line is looked up
        by its source file), or None when it is not a regular file there."""
        file_id = source_id(line_id)
        fs, root = self._fs
        path = f"{root}/{file_id}"
        try:
            if isinstance(fs, LocalFileSystem):
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    return None
                size, version = st.st_size, str(st.st_mtime_ns)
            else:
                info = fs.info(path)
                if info.get("type") not in (None, "file"):
                    return None
                size, version = int(info.get("size") or 0), _mtime(info)
            digest = content_sha256(fs, path) if self.verify_content else None
        except (FileNotFoundError, NotADirectoryError):
            return None
        listing = Listing(root=root, files=[], errors=[], refused=[])
        found = to_audio_file(listing, fs, Listed(file_id, size, version, digest))
        return found if line_id == file_id else found.model_copy(update={"id": line_id})

    def why_unlisted(self, line_id: str) -> str:
        file_id = source_id(line_id)
        if not posixpath.basename(file_id).lower().endswith(self.extensions):
            return f"not listed by this run: excluded by --extensions ({','.join(self.extensions)})"
        if not is_candidate(file_id, self.extensions):
            return "not listed by this run: a hidden or temporary file name"
        return "not listed by this run although it is on the audio root (a listing that missed it)"


def _find_remote(fs: fsspec.AbstractFileSystem, root: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """One bulk listing with details (S3: ListObjectsV2 pages; size and ETag included)."""
    prefix = root.rstrip("/") + "/"
    for path, info in fs.find(root, withdirs=False, detail=True).items():
        # Not posixpath.relpath: it would fold `p1/../../x` into `../x` and hide the escape.
        file_id = path[len(prefix):] if path.startswith(prefix) else path
        if is_candidate(file_id, extensions):
            yield file_id, info


def _find_local(root: str, extensions: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """Every candidate file under a local `root`, following symlinks like `find -L`.

    fsspec's local `find` types every symlink "other", so a symlinked clip or speaker folder
    would vanish. Here links are followed, but each real directory (st_dev, st_ino) is listed
    once: real directories first, then symlinked ones whose target was not listed yet, so a
    loop ends and a mesh of sibling links cannot multiply the ids. Entries that cannot be read
    come back typed "other" with a reason.
    """
    visited: set[tuple[int, int]] = set()
    linked: list[tuple[str, str]] = []  # (relative dir, path) of symlinked dirs, listed after the real tree

    def walk(start_rel: str, start_path: str) -> Iterator[tuple[str, dict]]:
        stack = [(start_rel, start_path)]
        while stack:
            rel, path = stack.pop()
            try:
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    logger.info("not listing %s again: it is a link to a folder already listed", path)
                    continue
                visited.add(key)
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                if not rel:
                    raise
                yield rel, {"type": "unlisted", "why": f"cannot list this folder: {e.strerror or e}"}
                continue
            subdirs = []
            for entry in entries:
                child_rel = f"{rel}/{entry.name}" if rel else entry.name
                child_path = f"{path.rstrip('/')}/{entry.name}"
                try:
                    is_dir = entry.is_dir(follow_symlinks=True)
                except OSError:
                    is_dir = False
                if is_dir:
                    (linked if entry.is_symlink() else subdirs).append((child_rel, child_path))
                    continue
                if not is_candidate(entry.name, extensions):
                    continue
                yield child_rel, _stat_info(entry, child_path)
            stack.extend(reversed(subdirs))

    yield from walk("", root)
    while linked:
        yield from walk(*linked.pop(0))


def _stat_info(entry: os.DirEntry, path: str) -> dict:
    try:
        st = entry.stat(follow_symlinks=True)
    except FileNotFoundError:
        return {"type": "other", "why": f"broken symbolic link to {os.readlink(path)}"}
    except OSError as e:  # e.g. ELOOP: a link that points at itself
        return {"type": "other", "why": f"cannot stat: {e.strerror or e}"}
    if stat.S_ISREG(st.st_mode):
        return {"type": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"type": "other", "why": "not a regular file (a FIFO, socket or device)"}


def make_batches(files: list[AudioFile], batch_size: int) -> list[Batch]:
    """Cut each folder's files (kept in id order) into batches of at most `batch_size`."""
    by_folder: dict[str, list[AudioFile]] = defaultdict(list)
    for f in files:
        by_folder[f.folder].append(f)
    batches = []
    for folder in sorted(by_folder):
        group = by_folder[folder]
        for start in range(0, len(group), batch_size):
            batches.append(Batch.model_construct(folder=folder, files=group[start : start + batch_size]))
    return batches


def shard_target(total: int, n_workers: int, shard_max_files: int) -> int:
    """Files per shard: about four shards per worker for small corpora, at most `shard_max_files`."""
    return max(1, min(shard_max_files, math.ceil(total / max(1, 4 * n_workers))))


def make_shards(batches: list[Batch], n_workers: int, shard_max_files: int) -> list[Shard]:
    """Pack consecutive batches into shards of about `shard_target` files."""
    target = shard_target(sum(len(b.files) for b in batches), n_workers, shard_max_files)
    packer = ShardPacker(target)
    shards = [s for batch in batches for s in packer.add(batch)]
    return shards + packer.close()


class ShardPacker:
    """Consecutive batches into shards of up to `target` files, emitted as each one fills."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self._current: list[Batch] = []
        self._size = 0

    def add(self, batch: Batch) -> list[Shard]:
        out = []
        if self._current and self._size + len(batch.files) > self.target:
            out = self.close()
        self._current.append(batch)
        self._size += len(batch.files)
        return out

    def close(self) -> list[Shard]:
        if not self._current:
            return []
        shard = Shard.model_construct(index=self.count, batches=self._current)
        self.count += 1
        self._current, self._size = [], 0
        return [shard]


def group_folders(folders: list[str], max_groups: int) -> list[list[str]]:
    """Split sorted folders into at most `max_groups` contiguous groups (one merge task each)."""
    if not folders:
        return []
    per_group = math.ceil(len(folders) / max_groups)
    return [folders[i : i + per_group] for i in range(0, len(folders), per_group)]


__all__ = [
    "AudioRoot", "Listed", "Listing", "scan_audio", "list_audio", "make_batches", "make_shards", "group_folders",
    "is_candidate", "id_problem", "folder_problem", "printable_id", "folder_of",
]

"""List audio under a root (any fsspec URL), cut it into batches, pack batches into shards.

Prefect costs ~0.1 s and one recorded task run per task (and its UI struggles past a few
thousand runs: prefect#8579, #12877, #16299), so a task takes a shard of many batches and the
number of shards grows with the corpus only up to `shard_max_files` per shard.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import stat
from collections import defaultdict

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.records import AudioFile, Batch, FileError, Shard, SourceInfo, folder_of
from tasks.storage import stem_id

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", "~")

logger = logging.getLogger(__name__)


def is_candidate(name: str, extensions: tuple[str, ...]) -> bool:
    """An audio file by suffix, and not a hidden or temp file still being written."""
    base = posixpath.basename(name)
    if base.startswith(".") or base.lower().endswith(_TEMP_SUFFIXES):
        return False
    return base.lower().endswith(extensions)


def _mtime(info: dict) -> str:
    for key in ("mtime", "LastModified", "last_modified", "ETag", "etag", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_audio(
    audio_root: str, extensions: tuple[str, ...], storage_options: dict | None = None
) -> tuple[list[AudioFile], list[FileError]]:
    """All audio files under `audio_root`, sorted by id, plus files that cannot be processed.

    Raises:
        FileNotFoundError: the root itself does not exist.
    """
    fs, root = fsspec.url_to_fs(audio_root, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"audio root not found or not a directory: {audio_root}")
    files: list[AudioFile] = []
    errors: list[FileError] = []
    if isinstance(fs, LocalFileSystem):
        found, unlisted = _find_local(root)
        errors += [FileError(id=_relative(path, root), stage="discover", error=why) for path, why in unlisted]
    else:
        found = fs.find(root, withdirs=False, detail=True)
    by_stem: dict[str, str] = {}
    for path, info in sorted(found.items()):
        file_id = _relative(path, root)
        if not is_candidate(file_id, extensions):
            continue
        if info.get("type") not in (None, "file"):
            # Not silently dropped: a FIFO would hang a reader, a broken link has nothing to read.
            errors.append(FileError(id=file_id, stage="discover", error=info.get("why") or "not a regular file"))
            continue
        stem = stem_id(file_id)
        if stem in by_stem:
            # transcriptions/{stem}.json would hold two files' results: refuse, don't overwrite.
            errors.append(FileError(
                id=file_id, stage="discover",
                error=f"same name as {by_stem[stem]} apart from the extension; rename one",
            ))
            continue
        by_stem[stem] = file_id
        size = int(info.get("size") or 0)
        full = path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
        files.append(AudioFile(id=file_id, path=full, source=SourceInfo(size=size, mtime=_mtime(info))))
    return files, errors


def _relative(path: str, root: str) -> str:
    return posixpath.relpath(path, root) if path.startswith(root) else path


def _find_local(root: str) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Every non-directory under a local `root`, following symlinks like `find -L`.

    fsspec's local `find` types every symlink "other" (fsspec 2026.9: `DirEntry.is_file(
    follow_symlinks=False)`), so a symlinked clip or speaker folder would vanish without a
    trace. Here links are followed; a link back to one of its own parent folders (a loop) is
    skipped, and entries that cannot be read are returned typed "other" with a reason.

    Returns:
        ({path: {"type", "size", "mtime"[, "why"]}}, [(folder, why) for folders that could not be listed])
    """
    found: dict[str, dict] = {}
    unlisted: list[tuple[str, str]] = []
    stack: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while stack:
        directory, ancestors = stack.pop()
        real = os.path.realpath(directory)
        if real in ancestors:
            logger.info("not following %s: a symlink back to its own parent folder %s", directory, real)
            continue
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            if directory == root:
                raise
            unlisted.append((directory, f"cannot list this folder: {e.strerror or e}"))
            continue
        for entry in entries:
            path = f"{directory.rstrip('/')}/{entry.name}"
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append((path, ancestors | {real}))
                    continue
                st = entry.stat(follow_symlinks=True)
            except FileNotFoundError:
                found[path] = {"type": "other", "why": f"broken symbolic link to {os.readlink(path)}"}
                continue
            except OSError as e:  # e.g. ELOOP: a link that points at itself
                found[path] = {"type": "other", "why": f"cannot stat: {e.strerror or e}"}
                continue
            if stat.S_ISREG(st.st_mode):
                found[path] = {"type": "file", "size": st.st_size, "mtime": st.st_mtime}
            else:
                found[path] = {"type": "other", "why": "not a regular file (a FIFO, socket or device)"}
    return found, unlisted


def make_batches(files: list[AudioFile], batch_size: int) -> list[Batch]:
    """Cut each folder's files (kept in id order) into batches of at most `batch_size`."""
    by_folder: dict[str, list[AudioFile]] = defaultdict(list)
    for f in files:
        by_folder[f.folder].append(f)
    batches = []
    for folder in sorted(by_folder):
        group = by_folder[folder]
        for start in range(0, len(group), batch_size):
            # model_construct: the files are validated records already; planning 1M files stays fast
            batches.append(Batch.model_construct(folder=folder, files=group[start : start + batch_size]))
    return batches


def make_shards(batches: list[Batch], n_workers: int, shard_max_files: int) -> list[Shard]:
    """Pack consecutive batches into shards.

    Small corpora get about four shards per worker so every worker stays busy; large ones get
    shards of up to `shard_max_files` files, so 1,000,000 files make ~1,000 shards per stage.
    """
    total = sum(len(b.files) for b in batches)
    if total == 0:
        return []
    target = math.ceil(total / max(1, 4 * n_workers))
    target = max(1, min(shard_max_files, target))
    shards: list[Shard] = []
    current: list[Batch] = []
    size = 0
    for batch in batches:
        if current and size + len(batch.files) > target:
            shards.append(Shard.model_construct(index=len(shards), batches=current))
            current, size = [], 0
        current.append(batch)
        size += len(batch.files)
    if current:
        shards.append(Shard.model_construct(index=len(shards), batches=current))
    return shards


def group_folders(folders: list[str], max_groups: int) -> list[list[str]]:
    """Split sorted folders into at most `max_groups` contiguous groups (one merge task each)."""
    if not folders:
        return []
    per_group = math.ceil(len(folders) / max_groups)
    return [folders[i : i + per_group] for i in range(0, len(folders), per_group)]


__all__ = ["list_audio", "make_batches", "make_shards", "group_folders", "is_candidate", "folder_of"]

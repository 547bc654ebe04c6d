"""List audio under a root (any fsspec URL), cut it into batches, pack batches into shards.

Prefect costs ~0.1 s and one recorded task run per task (and its UI struggles past a few
thousand runs: prefect#8579, #12877, #16299), so a task takes a shard of many batches and the
number of shards grows with the corpus only up to `shard_max_files` per shard.
"""

from __future__ import annotations

import math
import posixpath
from collections import defaultdict

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.records import AudioFile, Batch, FileError, Shard, SourceInfo, folder_of
from tasks.storage import stem_id

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", "~")


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
    found = fs.find(root, withdirs=False, detail=True)
    files: list[AudioFile] = []
    errors: list[FileError] = []
    by_stem: dict[str, str] = {}
    for path, info in sorted(found.items()):
        file_id = posixpath.relpath(path, root) if path.startswith(root) else path
        if not is_candidate(file_id, extensions):
            continue
        if info.get("type") not in (None, "file"):
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

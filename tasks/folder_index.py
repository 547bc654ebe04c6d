"""Per-folder index of intermediates: what makes a rerun cost O(folders + changed files) requests.

Without it a rerun reads two intermediates per file to decide reuse and two more to merge, one
request each (a million-file rerun on S3: ~4M sequential GETs). The index is one file per folder,
`.index/{folder}.json` under the results root (why that name collides with no output: see
`tasks.storage`), mapping each id to its latest successful transcription and tokens records as the
folder's last merge saw them: full records, so they carry both their provenance (source size/mtime,
decode fingerprint and requested language, tokeniser settings) and what a line needs (text, tokens,
quality).

- Merge rewrites it atomically (`Store.write_bytes`) under the folder lock, only when it changed.
- Stages read it once per folder per shard and skip files whose entry matches this run; only the
  files it does not vouch for (new, changed, failed last time, or done by a run that never merged)
  cost a read of their intermediates, all in one bulk call per folder.
- Merge takes unchanged files' records from it and reads only the others' intermediates, in bulk.

The per-file intermediates stay the contract: every new result is written there first. An index
entry is only a copy of one and is checked against this run's `Provenance` like any intermediate
(`tasks.provenance`); a missing, torn or foreign index reads as empty, which costs reads, never
correctness.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError

from tasks.records import AudioFile, Provenance, Record, Tokens, Transcription
from tasks.storage import Kind, Store

INDEX_DIR = ".index"
Reusable = Callable[[object, AudioFile, Provenance], bool]


class IndexEntry(Record):
    transcription: Transcription | None = None
    tokens: Tokens | None = None

    def get(self, kind: Kind) -> Transcription | Tokens | None:
        return self.transcription if kind == "transcriptions" else self.tokens


class FolderIndex(Record):
    version: Literal[1] = 1
    folder: str
    entries: dict[str, IndexEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class LoadedIndex:
    """An index as read, with its bytes, so an unchanged one is never written again."""

    index: FolderIndex
    raw: bytes | None

    def record(self, kind: Kind, file_id: str) -> Transcription | Tokens | None:
        entry = self.index.entries.get(file_id)
        return entry.get(kind) if entry is not None else None


def index_path(folder: str) -> str:
    return f"{INDEX_DIR}/{folder}.json"


def load_index(store: Store, folder: str) -> LoadedIndex:
    """The folder's index in one request; empty when absent, torn or another folder's."""
    raw = store.read_bytes(index_path(folder))
    empty = FolderIndex(folder=folder)
    if raw is None:
        return LoadedIndex(empty, None)
    try:
        index = FolderIndex.model_validate_json(raw)
    except (ValidationError, ValueError):
        return LoadedIndex(empty, raw)
    if index.folder != folder:
        return LoadedIndex(empty, raw)
    # An entry is trusted only for its own id (the records carry it).
    entries = {
        i: IndexEntry(
            transcription=e.transcription if e.transcription is not None and e.transcription.id == i else None,
            tokens=e.tokens if e.tokens is not None and e.tokens.id == i else None,
        )
        for i, e in index.entries.items()
    }
    return LoadedIndex(FolderIndex(folder=folder, entries=entries), raw)


def index_bytes(folder: str, entries: dict[str, IndexEntry]) -> bytes:
    """Deterministic bytes (ids sorted, empty entries dropped): equal content, equal bytes."""
    kept = {i: entries[i] for i in sorted(entries) if entries[i].transcription or entries[i].tokens}
    return FolderIndex(folder=folder, entries=kept).model_dump_json().encode()


def save_index(store: Store, loaded: LoadedIndex, entries: dict[str, IndexEntry]) -> bool:
    """Write the folder's new index unless it equals what was read; True if written.

    Call under the folder lock (`Store.folder_lock`), with `loaded` read under the same lock.
    """
    data = index_bytes(loaded.index.folder, entries)
    if data == loaded.raw:
        return False
    store.write_bytes(index_path(loaded.index.folder), data)
    return True


def reusable_ids(
    store: Store, kind: Kind, files: Iterable[AudioFile], expect: Provenance, reusable: Reusable
) -> set[str]:
    """Ids of `files` whose stage `kind` this run may skip.

    Per folder: one index read, then one bulk read of the intermediates of the files the index
    does not vouch for (results of a run that never reached its merge are still found there).
    """
    by_folder: dict[str, list[AudioFile]] = defaultdict(list)
    for f in files:
        by_folder[f.folder].append(f)
    done: set[str] = set()
    for folder, group in by_folder.items():
        loaded = load_index(store, folder)
        rest = []
        for f in group:
            if reusable(loaded.record(kind, f.id), f, expect):
                done.add(f.id)
            else:
                rest.append(f)
        if rest:
            stored = store.read_intermediates(kind, [f.id for f in rest])
            done.update(f.id for f in rest if reusable(stored[f.id], f, expect))
    return done

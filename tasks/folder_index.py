"""Per-folder index of intermediates: what makes a rerun cost O(folders + changed files) requests.

Without it a rerun reads two intermediates per file to decide reuse and two more to merge, one
request each (a million-file rerun on S3: ~4M sequential GETs). Each folder has two files under
the results root's hidden `.index/` (why those names collide with no output: see `tasks.storage`):

- `.index/{folder}.json`, the slim index: per id, only the key of its latest successful
  transcription and tokens (`tasks.provenance`: source size/mtime, decode fingerprint and
  requested language, a hash of the tokeniser settings), ~310 bytes a file (measured). Stages read this
  once per folder per shard and skip the files whose key matches this run; the files it does not
  vouch for (new, changed, failed last time, or done by a run that never merged) cost a read of
  their intermediates, in one bulk call per folder. No stage reads any text or tokens it skips.
- `.index/{folder}.content.records`, the content: one JSON line per id, sorted, with the full
  records (text, tokens, quality); not named `.jsonl`, so tools that glob a results root for
  JSONL outputs never mistake it for a folder's lines. Only merge reads it, streamed line by line beside the sorted files, so
  it never holds the folder in memory (`tasks.merge`).

Merge rewrites both under the folder lock, each only when it changed (the content first, so a
slim index never vouches for a record the content lacks, except after a crash between the two,
which merge detects and pays for with reads). The per-file intermediates stay the contract: every
new result is written there first. An index key only says where to look; what merge joins is the
full record, checked against this run's `Provenance` like any intermediate. A missing, torn or
foreign index (or one from before this layout) reads as empty, which costs reads, never correctness.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from tasks.provenance import (
    TokensKey,
    TranscriptionKey,
    settings_sha256,
    tokens_key,
    transcription_key,
    wanted_tokens_key,
    wanted_transcription_key,
)
from tasks.records import AudioFile, FileError, OutputOptions, Provenance, Record, Tokens, Transcription, line_order
from tasks.storage import Kind, Store

INDEX_DIR = ".index"
Reusable = Callable[[object, AudioFile, Provenance], bool]


class IndexEntry(Record):
    """One id's keys in the slim index."""

    transcription: TranscriptionKey | None = None
    tokens: TokensKey | None = None


class OutputStat(Record):
    """A stored output as its filesystem describes it: what tells "as merge left it" from "edited"."""

    size: int
    modified: str  # mtime / LastModified / ETag as the filesystem reports it, as text


class MergeStamp(Record):
    """What the folder's last merge wrote, and from which files: a rerun whose discovery and
    settings the index still vouches for, and whose outputs are as merge left them, would write
    the same bytes, so it skips the folder (`tasks.settled`). Written only by a merge in which no
    file failed (clips moved out by `drop_flagged` are not failures)."""

    ids_sha256: str  # the folder's discovered ids, sorted: a file added or removed since breaks it
    output: OutputOptions
    lines: int
    audio_seconds: float
    flagged: int
    worst: list[dict[str, Any]] = Field(default_factory=list)
    dropped: list[FileError] = Field(default_factory=list)  # stage "quality" only
    jsonl: OutputStat | None
    errors_jsonl: OutputStat | None  # None: merge removed it (nothing dropped)
    # Segment lines of long recordings (issue 22), so a settled folder's report still counts them.
    # A stamp from before these fields says 0: a folder with long files is then merged once more.
    segments: int = 0
    segment_seconds: float = 0.0
    segment_durations: list[float] = Field(default_factory=list)


class FolderIndex(Record):
    version: Literal[2] = 2  # 1 held full records: read as empty (a one-off cost of reads)
    folder: str
    entries: dict[str, IndexEntry] = Field(default_factory=dict)
    merged: MergeStamp | None = None  # absent in indexes written before it: the folder is merged again


class ContentLine(Record):
    """One line of `.index/{folder}.content.records`: an id's latest successful records."""

    id: str
    transcription: Transcription | None = None
    tokens: Tokens | None = None

    def get(self, kind: Kind) -> Transcription | Tokens | None:
        return self.transcription if kind == "transcriptions" else self.tokens


def entry_for(line: ContentLine) -> IndexEntry:
    return IndexEntry(
        transcription=transcription_key(line.transcription) if line.transcription is not None else None,
        tokens=tokens_key(line.tokens) if line.tokens is not None else None,
    )


@dataclass(frozen=True)
class LoadedIndex:
    """A slim index as read, with its bytes, so an unchanged one is never written again."""

    index: FolderIndex
    raw: bytes | None

    def vouches(self, kind: Kind, file: AudioFile, expect: Provenance, settings_hash: str | None = None) -> bool:
        """The index says `file`'s record of stage `kind` is one this run may reuse."""
        entry = self.index.entries.get(file.id)
        if entry is None:
            return False
        if kind == "transcriptions":
            wanted = wanted_transcription_key(file, expect)
            return wanted is not None and entry.transcription == wanted
        return entry.tokens == wanted_tokens_key(file, expect, settings_hash)


def index_path(folder: str) -> str:
    return f"{INDEX_DIR}/{folder}.json"


def content_path(folder: str) -> str:
    return f"{INDEX_DIR}/{folder}.content.records"


def load_index(store: Store, folder: str) -> LoadedIndex:
    """The folder's slim index in one request; empty when absent, torn, older or another folder's."""
    return parse_index(folder, store.read_bytes(index_path(folder)))


def parse_index(folder: str, raw: bytes | None) -> LoadedIndex:
    """A slim index from its stored bytes (None: absent); empty when torn, older or another folder's."""
    empty = FolderIndex(folder=folder)
    if raw is None:
        return LoadedIndex(empty, None)
    try:
        index = FolderIndex.model_validate_json(raw)
    except (ValidationError, ValueError):
        return LoadedIndex(empty, raw)
    if index.folder != folder:
        return LoadedIndex(empty, raw)
    return LoadedIndex(index, raw)


def index_bytes(folder: str, entries: dict[str, IndexEntry], merged: MergeStamp | None = None) -> bytes:
    """Deterministic bytes (ids sorted, empty entries dropped): equal content, equal bytes."""
    kept = {i: entries[i] for i in sorted(entries) if entries[i].transcription or entries[i].tokens}
    return FolderIndex(folder=folder, entries=kept, merged=merged).model_dump_json().encode()


def save_index(
    store: Store, loaded: LoadedIndex, entries: dict[str, IndexEntry], merged: MergeStamp | None = None
) -> bool:
    """Write the folder's new slim index unless it equals what was read; True if written.

    Call under the folder lock (`Store.folder_lock`), with `loaded` read under the same lock,
    after the content it describes and the outputs `merged` stamps were written.
    """
    data = index_bytes(loaded.index.folder, entries, merged)
    if data == loaded.raw:
        return False
    store.write_bytes(index_path(loaded.index.folder), data)
    return True


class ContentReader:
    """The content file streamed once, in id order: `take(id)` for ascending ids, then `digest`.

    Lines that are torn, foreign or out of order are passed over (their ids then read as absent);
    every byte is hashed, so the caller learns the stored file's sha256 without a second read.
    """

    def __init__(self, store: Store, folder: str) -> None:
        self._lines = store.iter_lines(content_path(folder))
        self._hash = hashlib.sha256()
        self._found = False
        self._current: ContentLine | None = None
        self._done = False

    def _next(self) -> ContentLine | None:
        for raw in self._lines:
            self._found = True
            self._hash.update(raw)
            try:
                line = ContentLine.model_validate_json(raw)
            except (ValidationError, ValueError):
                continue
            if self._current is not None and line_order(line.id) <= line_order(self._current.id):
                continue  # out of order: not from merge, trust nothing about it
            return line
        self._done = True
        return None

    def take(self, file_id: str) -> ContentLine | None:
        """The line of `file_id` (ids asked in ascending `line_order`: merge's order), or None."""
        while not self._done and (self._current is None or line_order(self._current.id) < line_order(file_id)):
            nxt = self._next()
            if nxt is None:
                break
            self._current = nxt
        return self._current if self._current is not None and self._current.id == file_id else None

    def digest(self) -> str | None:
        """sha256 of the whole stored file (reads the rest); None if there is none."""
        for raw in self._lines:
            self._found = True
            self._hash.update(raw)
        self._done = True
        return self._hash.hexdigest() if self._found else None


def content_line_bytes(line: ContentLine) -> bytes:
    return line.model_dump_json(exclude_none=True).encode() + b"\n"


def parse_content(raw: bytes) -> Iterator[ContentLine]:
    """Every valid line of a content file's bytes (tests and tools)."""
    for line in raw.splitlines():
        try:
            yield ContentLine.model_validate_json(line)
        except (ValidationError, ValueError):
            continue


def reusable_ids(
    store: Store, kind: Kind, files: Iterable[AudioFile], expect: Provenance, reusable: Reusable
) -> set[str]:
    """Ids of `files` whose stage `kind` this run may skip.

    Per folder: one read of the slim index (keys only), then one bulk read of the intermediates of
    the files it does not vouch for (results of a run that never reached its merge are still
    found there).
    """
    by_folder: dict[str, list[AudioFile]] = defaultdict(list)
    for f in files:
        by_folder[f.folder].append(f)
    settings_hash = settings_sha256(expect.tokenizer_settings)
    done: set[str] = set()
    for folder, group in by_folder.items():
        loaded = load_index(store, folder)
        rest = []
        for f in group:
            if loaded.vouches(kind, f, expect, settings_hash):
                done.add(f.id)
            else:
                rest.append(f)
        if rest:
            stored = store.read_intermediates(kind, [f.id for f in rest])
            done.update(f.id for f in rest if reusable(stored[f.id], f, expect))
    return done

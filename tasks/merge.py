"""Join a folder's intermediates into `{folder}.jsonl` (sorted by id) and `{folder}.errors.jsonl`.

Each run rewrites the folder from the files discovered now: no duplicates, no stale lines for
deleted files, and no line that vanishes unreported. Ids the folder's last merge wrote (lines or
errors lines) that this run did not list are looked up on the audio root (`AudioRoot.source_of`,
one request each): a file that is gone loses its line, and the report counts it (`removed`, with
why); a file still there (excluded by `--extensions`, or missed by a listing) keeps its line when
its records still match this run (`kept`), and is otherwise removed and reported as stale for this
run. Such a folder is never settled, so those lines are checked again at every run.

Merge trusts nothing it did not check: a record joins a line only if its provenance
matches this run's (`tasks.provenance`); otherwise the file misses that stage and is reported
failed, with the failed task's reason when there is one. `{folder}.errors.jsonl` holds one line
per failed file. The JSONL, the errors file and the folder index (`tasks.folder_index`) are
written atomically under the folder lock, so concurrent runs never interleave and a reader never
sees a torn file.

Memory stays flat in the folder's size for unchanged files: their records are streamed from the
index content one line at a time, beside the sorted files, and the JSONL and the new content are
streamed to temp files (`Store.stream_if_changed`). Only the records of files the index does not
vouch for (new or changed: read in one bulk call), the errors and the slim index are held.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections import defaultdict
from typing import Any, NamedTuple

from tasks.folder_index import (
    ContentLine,
    ContentReader,
    IndexEntry,
    LoadedIndex,
    content_line_bytes,
    content_path,
    entry_for,
    load_index,
    save_index,
)
from tasks.provenance import (
    own_failure,
    settings_sha256,
    tokens_problem,
    tokens_reusable,
    transcription_problem,
    transcription_reusable,
)
from tasks.discover import AudioRoot
from tasks.records import (
    SEGMENT_SAMPLE,
    AudioFile,
    FileError,
    FolderReport,
    OutputLine,
    OutputOptions,
    Provenance,
    QualityOutputLine,
    QualitySegmentOutputLine,
    RemovedLine,
    SegmentOutputLine,
    Tokens,
    Transcription,
    folder_of,
    line_order,
    source_id,
    split_segment_id,
)
from tasks.settled import merge_stamp
from tasks.storage import (
    REFUSED_ERRORS,
    UNKNOWN,
    Kind,
    Store,
    StreamWriter,
    errors_name,
    jsonl_name,
    output_name_problem,
    parse_intermediate,
)

WORST_CLIPS = 5  # flagged clips listed per folder in the report and the folder artifact
REMOVED_SHOWN = 10  # removed ids named per folder (with why) in its report; all are counted
_SIDES: tuple[tuple[Kind, str], ...] = (("transcriptions", "transcribe"), ("tokens", "tokenise"))


def merge_folder(
    folder: str,
    files: list[AudioFile],
    store: Store,
    expect: Provenance,
    known_errors: list[FileError] | None = None,
    stage_errors: dict[str, str] | None = None,
    output: OutputOptions = OutputOptions(),  # noqa: B008 (frozen record: a safe default)
    audio: AudioRoot | None = None,
) -> FolderReport:
    """Write the folder's outputs from the intermediates of `files` that match `expect`.

    Args:
        files: this run's discovery of the folder (ids with their source size/mtime).
        known_errors: failures found before any stage ran (e.g. at discovery).
        stage_errors: "transcribe"/"tokenise" -> why a task covering this folder failed; the
            reason given for files missing that stage.
        output: `with_quality` adds a `quality` object to each line; `drop_flagged` moves clips
            with quality flags to the errors file (stage "quality").
        audio: where to look up ids the last merge wrote that `files` lacks; None: they are
            removed as "not discovered" (still counted and named in the report).
    """
    known_errors = known_errors or []
    files = sorted({f.id: f for f in files}.values(), key=lambda f: line_order(f.id))  # segments by start
    # Audio files, not lines: a long recording is one file however many segment lines it gives.
    n_files = len({source_id(f.id) for f in files} | {source_id(e.id) for e in known_errors})
    with store.folder_lock(folder):
        refused = output_name_problem(folder)
        if refused is not None:
            errors = _one_per_file([*known_errors, *(FileError(id=f.id, stage="merge", error=refused) for f in files)])
            changed = _write_errors(store, folder, errors)
            return FolderReport(
                folder=folder, files=n_files, lines=0, errors=errors, changed=changed,
                jsonl=store.display(jsonl_name(folder)), errors_jsonl=store.display(errors_name(folder)),
            )
        listed = {f.id for f in files} | {e.id for e in known_errors}
        before = _stored_ids(store, folder, listed)
        carried, removed = _recheck(before.unlisted, {source_id(i) for i in listed}, audio)
        joined = _join(folder, files, store, expect, stage_errors or {}, output, carried, before.jsonl_digest)
        removed = sorted([*removed, *joined.removed], key=lambda r: line_order(r.id))
        errors = _one_per_file([*known_errors, *joined.errors])
        # A file is new when this run produced one of its lines and none of them failed (a long
        # recording with a failed segment counts as failed, once).
        new = len(joined.new_sources - {source_id(e.id) for e in errors if e.stage != "quality"})
        changed = joined.changed
        changed |= _write_errors(store, folder, errors, before.errors_raw)
        report = FolderReport(
            folder=folder, files=n_files, lines=joined.lines, errors=errors,
            audio_seconds=joined.audio_seconds, changed=changed, jsonl=store.display(jsonl_name(folder)),
            errors_jsonl=store.display(errors_name(folder)) if errors else None,
            new=new, flagged=joined.flagged, worst=joined.worst(),
            removed=len(removed), removed_ids=removed[:REMOVED_SHOWN], kept=joined.kept,
            segments=joined.segments, segment_seconds=round(joined.segment_seconds, 3),
            segment_durations=joined.segment_durations,
        )
        # Last, after the content and both outputs, so its stamp describes them as written
        # (a crash before this leaves the old stamp, which then fails to match: merged again).
        # Lines kept for unlisted files leave no stamp: the folder is merged (they are checked) again.
        stamp = merge_stamp(store, folder, files, report, output) if not carried else None
        save_index(store, joined.index, joined.entries, stamp)
    return report


class _Before(NamedTuple):
    """What the folder's outputs held before this merge: ids this run did not list (sorted), the
    JSONL's sha256 and the errors file's bytes."""

    unlisted: list[str]
    jsonl_digest: str | None
    errors_raw: bytes | None


def _stored_ids(store: Store, folder: str, listed: set[str]) -> _Before:
    """Read the stored JSONL (streamed) and errors file once: the ids in them that are not in
    `listed`, and the JSONL's hash (what `stream_if_changed` would otherwise read it again for)."""
    unlisted: set[str] = set()
    h, found = hashlib.sha256(), False
    for raw in store.iter_lines(jsonl_name(folder)):
        found = True
        h.update(raw)
        if (file_id := _id_of(raw)) is not None and file_id not in listed:
            unlisted.add(file_id)
    errors_raw = store.read_bytes(errors_name(folder))
    for raw in (errors_raw or b"").splitlines():
        if (file_id := _id_of(raw)) is not None and file_id not in listed:
            unlisted.add(file_id)
    return _Before(sorted(unlisted), h.hexdigest() if found else None, errors_raw)


_DECODER = json.JSONDecoder()


def _id_of(raw: bytes) -> str | None:
    """A stored line's id, without parsing its tokens when merge wrote it (`{"id":"...",...`)."""
    if raw.startswith(b'{"id":"'):  # only the head: a line's tokens can be ~100 KB
        try:
            value = _DECODER.raw_decode(raw[:4096].decode("utf-8", "ignore"), 6)[0]
            return value if isinstance(value, str) else None
        except ValueError:
            pass  # an id longer than the head, or a line by other hands: parse it whole
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    value = record.get("id") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _recheck(
    vanished: list[str], listed_sources: set[str], audio: AudioRoot | None
) -> tuple[dict[str, tuple[AudioFile, str]], list[RemovedLine]]:
    """Split ids the last merge wrote and this run did not list: files still on the audio root
    (to carry, with why they were not listed) and files gone (removed, with why). Ids are line
    ids: a segment's line is looked up by its source file."""
    carried: dict[str, tuple[AudioFile, str]] = {}
    removed: list[RemovedLine] = []
    for file_id in vanished:
        if source_id(file_id) in listed_sources:  # the file was listed, and gave other lines this run
            removed.append(RemovedLine(id=file_id, reason="its file was listed by this run and no longer has this "
                                                          "line (segmented differently, or no longer segmented)"))
            continue
        if audio is None:
            removed.append(RemovedLine(id=file_id, reason="not discovered by this run"))
            continue
        try:
            found = audio.source_of(file_id)
        except OSError as e:
            found, gone = None, f"not discovered by this run, and the audio root could not be asked about it: {e}"
        else:
            gone = "not discovered by this run: the file is gone from the audio root"
        if found is None:
            removed.append(RemovedLine(id=file_id, reason=gone))
        else:
            carried[file_id] = (found, audio.why_unlisted(file_id))
    return carried, removed


def _join(
    folder: str, files: list[AudioFile], store: Store, expect: Provenance, stage_errors: dict[str, str],
    output: OutputOptions, carried: dict[str, tuple[AudioFile, str]] | None = None, jsonl_digest: Any = UNKNOWN,
) -> _Joined:
    """One pass over the folder, writing its JSONL, index content and slim index.

    The slim index says which records to take from the content; one it vouched for that the
    content lacks (a crash between their writes, a hand-edited file) is read from its
    intermediate in a second pass instead: reads, never a wrong line.
    """
    carried = carried or {}
    if carried:
        files = sorted([*files, *(f for f, _ in carried.values())], key=lambda f: line_order(f.id))
    index = load_index(store, folder)
    settings_hash = settings_sha256(expect.tokenizer_settings)
    vouched: dict[Kind, set[str]] = {
        kind: {f.id for f in files if index.vouches(kind, f, expect, settings_hash)} for kind, _ in _SIDES
    }
    fetched: dict[Kind, dict[str, Any]] = {"transcriptions": {}, "tokens": {}}
    for _ in range(2):
        _read_missing(store, files, vouched, fetched)
        joined = _Joined(expect, stage_errors, output, {i: why for i, (_, why) in carried.items()})
        try:
            joined.run(folder, files, store, index, vouched, fetched, jsonl_digest)
        except _ContentLost:
            for kind in vouched:
                vouched[kind] -= joined.lost[kind]
            continue
        return joined
    raise AssertionError("unreachable: the second pass vouches only for what the first found")


class _ContentLost(Exception):
    """The slim index vouched for records the content does not hold: discard the pass."""


class _Joined:
    """One folder's records joined into lines (streamed out), errors and counts."""

    def __init__(
        self, expect: Provenance, stage_errors: dict[str, str], output: OutputOptions, unlisted: dict[str, str]
    ) -> None:
        self.expect, self.stage_errors, self.output = expect, stage_errors, output
        self.unlisted = unlisted  # id -> why this run did not list it (still on the audio root)
        self.errors: list[FileError] = []
        self.removed: list[RemovedLine] = []
        self.kept = 0
        self.lost: dict[Kind, set[str]] = {"transcriptions": set(), "tokens": set()}
        self.lines = 0
        self.audio_seconds = 0.0
        self.new_sources: set[str] = set()  # audio files with a line whose intermediate this run produced
        self.flagged = 0
        self.changed = False
        self.index: LoadedIndex | None = None  # the slim index as read, and the entries to save
        self.entries: dict[str, IndexEntry] = {}
        self._worst: list[tuple[tuple, dict[str, Any]]] = []  # a bounded heap of the worst flagged clips
        self.segments = 0  # segment lines of long recordings, their seconds and a few durations
        self.segment_seconds = 0.0
        self.segment_durations: list[float] = []

    def run(
        self, folder: str, files: list[AudioFile], store: Store, index: LoadedIndex, vouched: dict[Kind, set[str]],
        fetched: dict[Kind, dict[str, Any]], jsonl_digest: Any = UNKNOWN,
    ) -> None:
        content = ContentReader(store, folder)
        entries: dict[str, IndexEntry] = {}
        checks = (transcription_reusable, tokens_reusable)
        with store.stream_if_changed(jsonl_name(folder), jsonl_digest) as out, \
                store.stream_if_changed(content_path(folder)) as new_content:
            for f in files:
                stored = content.take(f.id) if f.id in vouched["transcriptions"] | vouched["tokens"] else None
                records: dict[Kind, Any] = {}
                for (kind, _), reusable in zip(_SIDES, checks, strict=True):
                    if f.id in vouched[kind]:
                        records[kind] = stored.get(kind) if stored is not None else None
                        if not reusable(records[kind], f, self.expect):
                            self.lost[kind].add(f.id)
                    else:
                        records[kind] = fetched[kind].get(f.id)
                t, k = records["transcriptions"], records["tokens"]
                # The index keeps the latest success known for each stage, matching this run or
                # not, so switching settings back and forth stays cheap.
                line = ContentLine(
                    id=f.id, transcription=t if isinstance(t, Transcription) else None,
                    tokens=k if isinstance(k, Tokens) else None,
                )
                if line.transcription is not None or line.tokens is not None:
                    entries[f.id] = entry_for(line)
                    new_content.write(content_line_bytes(line))
                self._join_one(f, t, k, out)
            if any(self.lost.values()):
                raise _ContentLost
            new_content.old_digest = content.digest()  # streamed already: no second read
        self.changed = out.changed
        self.index, self.entries = index, entries  # saved by merge_folder, after every output

    def _join_one(self, f: AudioFile, t: Any, k: Any, out: StreamWriter) -> None:
        problems = {
            "transcriptions": transcription_problem(t, f, self.expect), "tokens": tokens_problem(k, f, self.expect),
        }
        why_unlisted = self.unlisted.get(f.id)
        if problems["transcriptions"] is None and problems["tokens"] is None:
            if why_unlisted is not None:
                self.kept += self._add_line(t, k, out)
                return
            if self._add_line(t, k, out):
                # Counted once the line is written (a dropped clip is an error, not new), and only
                # for what this run produced: a record reused, or left by an interrupted run, is not.
                run_id = self.expect.run_id
                if run_id is not None and run_id in (t.run_id, k.run_id):
                    self.new_sources.add(source_id(f.id))
            return
        if why_unlisted is not None:  # a stale line kept would break "no stale lines": removed, said so
            problem = problems["transcriptions"] or problems["tokens"]
            reason = f"{why_unlisted}; its line no longer matches this run ({problem})"
            self.removed.append(RemovedLine(id=f.id, reason=reason))
            return
        failed = [
            (stage, _stage_failure(kind, stage, record, f, problems[kind], self.stage_errors))
            for (kind, stage), record in zip(_SIDES, (t, k), strict=True) if problems[kind] is not None
        ]
        self.errors.append(_combine(f.id, failed))

    def _add_line(self, t: Transcription, k: Tokens, out: StreamWriter) -> bool:
        """Write the file's line; False when `drop_flagged` moved it to the errors instead."""
        flags = list(t.quality.flags) if t.quality is not None else []
        if flags:
            self.flagged += 1
            self._keep_worst(t, flags)
            if self.output.drop_flagged:
                self.errors.append(FileError(
                    id=t.id, stage="quality", error=f"quality flags: {', '.join(flags)}; text: {t.text[:120]!r}",
                ))
                return False
        segment = split_segment_id(t.id)
        if segment is not None:  # a long recording's segment (issue 22)
            line = segment_line(t, k, segment, quality_object(t, k) if self.output.with_quality else None)
            self.segments += 1
            self.segment_seconds += segment[2] - segment[1]
            if len(self.segment_durations) < SEGMENT_SAMPLE:
                self.segment_durations.append(round(segment[2] - segment[1], 3))
        elif self.output.with_quality:
            line: OutputLine = QualityOutputLine(
                id=t.id, transcription=t.text, token_array=k.token_array, quality=quality_object(t, k)
            )
        else:
            line = OutputLine(id=t.id, transcription=t.text, token_array=k.token_array)
        out.write(line.model_dump_json().encode() + b"\n")
        self.lines += 1
        self.audio_seconds += t.duration
        return True

    def _keep_worst(self, t: Transcription, flags: list[str]) -> None:
        """The few flagged clips most worth a look: most flags, then highest compression ratio."""
        q = t.quality
        badness = (-len(flags), -((q and q.compression_ratio) or 0.0), (q and q.avg_logprob) or 0.0, t.id)
        clip = {"id": t.id, "flags": flags, "text": t.text[:200],
                "compression_ratio": q and q.compression_ratio, "avg_logprob": q and q.avg_logprob}
        item = (_Reverse(badness), clip)
        if len(self._worst) < WORST_CLIPS:
            heapq.heappush(self._worst, item)
        elif item[0] > self._worst[0][0]:
            heapq.heapreplace(self._worst, item)

    def worst(self) -> list[dict[str, Any]]:
        return [clip for _, clip in sorted(self._worst, key=lambda item: item[0].key)]


class _Reverse:
    """Heap order inverted: the heap's top is the least bad of the kept clips."""

    def __init__(self, key: tuple) -> None:
        self.key = key

    def __lt__(self, other: _Reverse) -> bool:
        return self.key > other.key

    def __gt__(self, other: _Reverse) -> bool:
        return self.key < other.key


def segment_line(
    t: Transcription, k: Tokens, segment: tuple[str, float, float], quality: dict[str, Any] | None
) -> OutputLine:
    """A segment's line: its id, source id, start and end (seconds in the source), text, tokens."""
    source_id, start, end = segment
    fields = dict(id=t.id, source_id=source_id, start=start, end=end, transcription=t.text, token_array=k.token_array)
    return SegmentOutputLine(**fields) if quality is None else QualitySegmentOutputLine(**fields, quality=quality)


def quality_object(t: Transcription, k: Tokens) -> dict[str, Any]:
    """The `quality` of a `--with-quality` line: duration and language, the service's transcript
    quality and the audio's, in one flat object (docs list each field's meaning and unit)."""
    quality: dict[str, Any] = {"duration": t.duration, "language": t.language}
    if t.quality is not None:
        quality.update(t.quality.model_dump())
    if k.audio is not None:
        quality.update(k.audio.model_dump())
    return quality


def _read_missing(
    store: Store, files: list[AudioFile], vouched: dict[Kind, set[str]], fetched: dict[Kind, dict[str, Any]]
) -> None:
    """Add to `fetched` the intermediates the index does not vouch for, both stages in one bulk read."""
    wanted = [
        (kind, f.id) for f in files for kind, _ in _SIDES if f.id not in vouched[kind] and f.id not in fetched[kind]
    ]
    blobs = store.read_many([store.intermediate(kind, i) for kind, i in wanted])
    for (kind, file_id), data in zip(wanted, blobs, strict=True):
        fetched[kind][file_id] = parse_intermediate(data, file_id, Transcription if kind == "transcriptions" else Tokens)


def _stage_failure(
    kind: Kind, stage: str, record: object, file: AudioFile, problem: str, stage_errors: dict[str, str]
) -> FileError:
    """Why `file` has no usable record for one stage: its own recorded failure, else the failed
    task's reason, else what is wrong with what is stored."""
    failure = own_failure(record, file)
    if failure is not None:
        return FileError(id=file.id, stage=failure.stage, error=failure.error)
    task_error = stage_errors.get(stage)
    if task_error:
        detail = "" if problem == "none stored" else f" ({problem})"
        return FileError(id=file.id, stage=stage, error=f"the {stage} task failed: {task_error}{detail}")
    if problem == "none stored":
        problem = "the task did not finish (interrupted, or its worker was lost)"
    return FileError(id=file.id, stage=stage, error=f"no {stage} result for this run: {problem}")


def _combine(file_id: str, failed: list[tuple[str, FileError]]) -> FileError:
    """One error per file: the first failing stage, and each failed stage's error in the text,
    labelled (the same text once)."""
    first = failed[0][1]
    if len({e.error for _, e in failed}) == 1:
        return first
    return FileError(id=file_id, stage=first.stage, error="; ".join(f"{label}: {e.error}" for label, e in failed))


def _one_per_file(errors: list[FileError]) -> list[FileError]:
    """Sorted by id, one line per id: a file's several errors are combined into one."""
    by_id: dict[str, list[FileError]] = defaultdict(list)
    for e in errors:
        if e not in by_id[e.id]:
            by_id[e.id].append(e)
    return [_combine(i, [(e.stage, e) for e in by_id[i]]) for i in sorted(by_id)]


def _write_errors(store: Store, folder: str, errors: list[FileError], stored: Any = UNKNOWN) -> bool:
    """True when the stored errors file changed: rewritten, or removed because none are left.
    `stored`: its bytes when the caller read them already (None: absent)."""
    if errors:
        return store.write_lines_if_changed(errors_name(folder), errors, stored)
    if stored is None:
        return False
    return store.remove(errors_name(folder))


def write_refused(store: Store, refused: list[FileError]) -> str | None:
    """Files refused at discovery because their folder cannot be written: `_refused.errors.jsonl`
    at the results root, rewritten each run like a folder's errors file (removed when none are
    left), so the list outlives the run's plan. Returns where they are, or None."""
    with store.folder_lock(REFUSED_ERRORS):
        if refused:
            store.write_lines_if_changed(REFUSED_ERRORS, sorted(refused, key=lambda e: e.id))
            return store.display(REFUSED_ERRORS)
        store.remove(REFUSED_ERRORS)
        return None


# -- Prefect task ------------------------------------------------------------------------------
from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402

from tasks.settings import PipelineSettings  # noqa: E402


@task(name="merge-folders", task_run_name="merge-{label}", cache_policy=NO_CACHE)
def merge_folders(
    plan: str, group: int, label: str, settings: PipelineSettings, failed: dict[str, str] | None = None
) -> list[FolderReport]:
    """Merge the folders of group `group` of the run plan at `plan` into their JSONL files.

    `failed` maps the group's failed stage tasks ("transcribe-3") to their error, which becomes
    the reason for the missing stage of their files.
    """
    return merge_group(plan, group, settings, failed or {})


def merge_group(plan: str, group: int, settings: PipelineSettings, failed: dict[str, str]) -> list[FolderReport]:
    """`merge_folders` without Prefect (the flow calls it in-process when the cluster is gone)."""
    from tasks.plan import group_files, load_group, load_plan

    run, members = load_plan(plan), load_group(plan, group)
    files, shards_of = group_files(run, members)
    store = Store(settings.results_root)
    output = OutputOptions(with_quality=settings.with_quality, drop_flagged=settings.drop_flagged)
    audio = AudioRoot(settings.audio_root, settings.extensions, settings.verify_content)
    reports = []
    for folder in members.folders:
        stage_errors: dict[str, str] = {}
        for stage in ("transcribe", "tokenise"):
            reasons = [failed[key] for i in shards_of.get(folder, []) if (key := f"{stage}-{i}") in failed]
            if reasons:
                stage_errors[stage] = reasons[0]
        known = [e for e in members.errors if folder_of(e.id) == folder]
        reports.append(merge_folder(folder, files[folder], store, run.provenance, known, stage_errors, output, audio))
    return reports

"""Atomic writes, intermediates and merge on local disk and memory://."""

from __future__ import annotations

import json
import os
import time
import tracemalloc

import pytest

from tasks.discover import folder_problem
from tasks.merge import merge_folder
from tasks.records import AudioFile, Failure, FileError, Provenance, SourceInfo, Tokens, Transcription
from tasks.storage import Output, Store, output_of, stem_id

SRC = SourceInfo(size=10, mtime="1")
EXPECT = Provenance(decode_fingerprint="fp1", language=None, tokenizer_settings={"seed": 0})


def _transcription(file_id: str, text: str = "hello") -> Transcription:
    return Transcription(id=file_id, text=text, language="en", duration=1.5, model="tiny.en", service_url="x",
                         source=SRC, decode_fingerprint="fp1")


def _tokens(file_id: str) -> Tokens:
    return Tokens(id=file_id, token_array=[1, 2, 3], tokenizer="rpq", tokenizer_settings={"seed": 0}, source=SRC)


def _files(*ids: str) -> list[AudioFile]:
    return [AudioFile(id=i, path=f"/audio/{i}", source=SRC) for i in ids]


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "results"))
    return Store(f"memory://store-test-{os.getpid()}-{id(tmp_path)}")


def test_intermediates_mirror_input_paths(store):
    store.write_record("transcriptions", _transcription("p225/p225_001_mic2.flac"))
    assert store.intermediate("transcriptions", "p225/p225_001_mic2.flac") == "transcriptions/p225/p225_001_mic2.json"
    assert store.read_transcription("p225/p225_001_mic2.flac") == _transcription("p225/p225_001_mic2.flac")
    assert store.read_transcription("p226/p225_001_mic2.flac") is None  # other folder, same name


def test_torn_or_foreign_intermediate_reads_as_missing(store):
    store.write_bytes("tokens/p1/a.json", b'{"id": "p1/a.flac", "token_arr')
    assert store.read_tokens("p1/a.flac") is None
    store.write_record("tokens", _tokens("p1/b.wav"))
    assert store.read_tokens("p1/b.flac") is None  # same stem, different file


def test_local_write_leaves_no_temp_files(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("x/y.jsonl", b"one\n")
    store.write_bytes("x/y.jsonl", b"two\n")
    assert os.listdir(tmp_path / "x") == ["y.jsonl"]
    assert (tmp_path / "x" / "y.jsonl").read_bytes() == b"two\n"


def test_temps_left_by_a_killed_writer_are_swept_once_stale(tmp_path):
    """A SIGKILL between mkstemp and rename leaves `.tmp-*.part`; the next run removes it,
    but never a temp young enough to belong to a run writing right now."""
    store = Store(str(tmp_path))
    store.write_bytes("p1.jsonl", b"line\n")
    stale = tmp_path / "transcriptions" / "p1" / ".tmp-abc.part"
    fresh = tmp_path / ".tmp-def.part"
    lookalike = tmp_path / "transcriptions" / "p1" / ".tmp-notes.txt"
    for path in (stale, fresh, lookalike):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    os.utime(lookalike, (two_hours_ago, two_hours_ago))
    assert store.sweep_stale_temps(older_than_s=3600) == [str(stale)]
    assert not stale.exists() and fresh.exists() and lookalike.exists()
    assert (tmp_path / "p1.jsonl").read_bytes() == b"line\n"
    assert Store(f"memory://sweep-{os.getpid()}").sweep_stale_temps() == []


def test_folders_with_results_are_the_jsonl_files_only(store):
    assert store.folders_with_results() == set()
    for relative in ("p225.jsonl", "p225.errors.jsonl", "b/deep/er.jsonl", "gone.errors.jsonl",
                     "transcriptions/p225/p225_001.json", "tokens/p225/x.json", ".locks/abc.lock", "notes.txt",
                     ".index/p225.json", ".index/b/deep/er.json",
                     # internal files that end in .jsonl (issue 20): a run's refused list, the run-level
                     # refused errors file, a report, future intermediates, temps of a killed writer
                     "_runs/20261206T084210Z-278ce5d9/refused.jsonl", "_refused.errors.jsonl",
                     "_report/x.jsonl", "segments/p225/a.jsonl", ".tmp-x.part", "p1.jsonl.tmp-0a1b"):
        store.write_bytes(relative, b"{}\n")
    assert store.folders_with_results() == {"p225", "b/deep/er"}
    assert sorted(store.outputs()) == [
        ("b/deep/er.jsonl", Output("b/deep/er", "lines")), ("gone.errors.jsonl", Output("gone", "errors")),
        ("p225.errors.jsonl", Output("p225", "errors")), ("p225.jsonl", Output("p225", "lines")),
    ]


def test_one_rule_says_what_is_a_folders_output_and_discovery_refuses_folders_that_would_break_it():
    from flows.artifacts import REPORT_DIR
    from tasks.folder_index import INDEX_DIR
    from tasks.manifest import MANIFEST_NAME
    from tasks.ownership import OWNER_FILE
    from tasks.plan import RUNS_DIR
    from tasks.storage import INTERNAL_DIRS, INTERNAL_FILES, REFUSED_ERRORS

    # Every folder and file the product names for itself is registered with the rule.
    assert {REPORT_DIR, INDEX_DIR, RUNS_DIR, "transcriptions", "tokens", "segments"} <= INTERNAL_DIRS
    assert {OWNER_FILE, REFUSED_ERRORS, MANIFEST_NAME} <= INTERNAL_FILES
    assert output_of("_runs.jsonl") == Output("_runs", "lines")  # a speaker folder named _runs: fine
    assert output_of("tokens.jsonl") == Output("tokens", "lines")
    for internal in ("_runs/r/refused.jsonl", "tokens/p1.jsonl", "segments/p1.jsonl", "_refused.errors.jsonl",
                     ".index/p1.jsonl", "p1/.hidden.jsonl", "p1.json", "_owner.json", "manifest.json"):
        assert output_of(internal) is None, internal
    # Folders whose outputs would land among internal names are refused at discovery.
    assert folder_problem("_runs/x") and folder_problem("tokens/p1") and folder_problem("_refused")
    assert folder_problem("_runs") is None and folder_problem("tokens") is None and folder_problem("p1/_runs") is None


def test_merge_sorted_complete_lines_and_errors(store):
    ids = ["p1/b.flac", "p1/a.flac", "p1/c.flac", "p1/d.flac"]
    for i in ["p1/a.flac", "p1/b.flac"]:
        store.write_record("transcriptions", _transcription(i, text=i))
        store.write_record("tokens", _tokens(i))
    store.write_record("transcriptions", Failure(id="p1/c.flac", stage="decode", error="not audio", source=SRC))
    store.write_record("tokens", Failure(id="p1/c.flac", stage="decode", error="not audio", source=SRC))
    report = merge_folder("p1", _files(*ids), store, EXPECT)
    lines = [json.loads(x) for x in store.read_bytes("p1.jsonl").decode().splitlines()]
    assert [x["id"] for x in lines] == ["p1/a.flac", "p1/b.flac"]
    assert lines[0] == {"id": "p1/a.flac", "transcription": "p1/a.flac", "token_array": [1, 2, 3]}
    errors = [FileError.model_validate_json(x) for x in store.read_bytes("p1.errors.jsonl").decode().splitlines()]
    # One line per failed file: d.flac missed both stages and is listed once, naming both.
    assert [(e.id, e.stage) for e in errors] == [("p1/c.flac", "decode"), ("p1/d.flac", "transcribe")]
    assert errors[0].error == "not audio"
    assert errors[1].error.startswith("transcribe: no transcribe result for this run: the task did not finish")
    assert "; tokenise: no tokenise result for this run" in errors[1].error
    assert report.lines == 2 and report.files == 4 and report.audio_seconds == 3.0 and report.errors == errors


def test_merge_rewrites_from_scratch_and_skips_identical(store):
    for i in ["p1/a.flac", "p1/b.flac"]:
        store.write_record("transcriptions", _transcription(i))
        store.write_record("tokens", _tokens(i))
    assert merge_folder("p1", _files("p1/a.flac", "p1/b.flac"), store, EXPECT).changed
    assert not merge_folder("p1", _files("p1/a.flac", "p1/b.flac"), store, EXPECT).changed
    report = merge_folder("p1", _files("p1/b.flac"), store, EXPECT)  # a.flac deleted from the corpus
    assert report.changed
    assert [json.loads(x)["id"] for x in store.read_bytes("p1.jsonl").decode().splitlines()] == ["p1/b.flac"]
    assert store.read_bytes("p1.errors.jsonl") is None


def test_stem_id():
    assert stem_id("p225/p225_001_mic2.flac") == "p225/p225_001_mic2"
    assert stem_id("a/b/c.d.wav") == "a/b/c.d"


def test_folder_lock_is_keyed_on_the_resolved_root(tmp_path, monkeypatch):
    """Regression (issue 11): `results` and `/abs/results` locked different files, so two runs
    naming one root two ways could merge the same folder at once."""
    import threading

    from filelock import FileLock, Timeout

    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    spellings = [Store("real"), Store("./real/"), Store(str(tmp_path / "real")), Store(str(tmp_path / "link")),
                 Store(f"file://{tmp_path}/real")]
    assert len({s.lock_path("p1") for s in spellings}) == 1
    assert spellings[0].lock_path("p1") != spellings[0].lock_path("p2")
    assert Store("memory://bucket/r").canonical == Store("memory:///bucket/r/").canonical == "memory:///bucket/r"
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with spellings[0].folder_lock("p1"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(Timeout):  # another spelling of the same root waits for the holder
            with FileLock(spellings[3].lock_path("p1"), timeout=0.2):
                pass
    finally:
        release.set()
        thread.join(10)
    with spellings[3].folder_lock("p1", timeout_s=1):
        pass


def test_read_many_is_glob_safe_and_reports_absent_files(store):
    store.write_bytes("p1/[a].json", b"A")
    store.write_bytes("p1/b.json", b"B")
    assert store.read_many(["p1/[a].json", "p1/missing.json", "p1/b.json"]) == [b"A", None, b"B"]
    assert store.read_many([]) == []


def _big_folder(store: Store, n: int, run_id: str | None, tokens: int = 2000) -> list[AudioFile]:
    ids = [f"p1/{i:04d}.flac" for i in range(n)]
    for i in ids:
        store.write_record("transcriptions", _transcription(i, text=f"text of {i} " * 20).model_copy(
            update={"run_id": run_id}))
        store.write_record("tokens", _tokens(i).model_copy(
            update={"token_array": list(range(1000, 1000 + tokens)), "run_id": run_id}))
    return _files(*ids)


def _peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_unchanged_merge_holds_one_record_at_a_time_not_the_folder(tmp_path):
    """Review finding 1: merge parsed the whole folder's index (text, tokens) and held it, its
    next entries and every line at once. Now unchanged records stream from the index content:
    what grows with the folder is its slim index and the file list (~5 KB a file, measured), not
    its records (~43 KB a file here as JSON, several times that parsed)."""
    peaks, contents = {}, {}
    for n in (20, 80):
        store = Store(str(tmp_path / f"results-{n}"))
        files = _big_folder(store, n, run_id="r1", tokens=8000)
        expect = EXPECT.model_copy(update={"run_id": "r1"})
        assert merge_folder("p1", files, store, expect).new == n  # first merge: reads intermediates
        again = EXPECT.model_copy(update={"run_id": "r2"})
        peaks[n] = _peak_bytes(lambda: merge_folder("p1", files, store, again))  # noqa: B023
        report = merge_folder("p1", files, store, again)
        assert report.lines == n and report.new == 0 and not report.changed
        contents[n] = (tmp_path / f"results-{n}" / ".index" / "p1.content.records").stat().st_size
        assert peaks[n] < contents[n], (peaks, contents)  # never the folder's records at once
    # 60 more files: a small fraction of their records' bytes more (the old merge: several times them).
    assert peaks[80] - peaks[20] < (contents[80] - contents[20]) / 4, (peaks, contents)


def test_records_the_slim_index_vouches_for_but_the_content_lacks_are_read_again(tmp_path):
    """A crash between the content's write and the slim index's, or a torn/foreign content file:
    merge notices the records it was promised are absent and reads their intermediates."""
    store = Store(str(tmp_path / "results"))
    files = _big_folder(store, 5, run_id="r1", tokens=5)
    merge_folder("p1", files, store, EXPECT)
    expected = store.read_bytes("p1.jsonl")
    content = tmp_path / "results" / ".index" / "p1.content.records"
    lines = content.read_bytes().splitlines(keepends=True)
    for damaged in (b"", lines[0] + b'{"id": "p1/0001.flac", "transcr\n' + b"".join(lines[2:]),
                    b"".join(reversed(lines))):
        content.write_bytes(damaged)
        report = merge_folder("p1", files, store, EXPECT)
        assert report.lines == 5 and report.errors == [] and store.read_bytes("p1.jsonl") == expected
        assert content.read_bytes() == b"".join(lines)  # rewritten whole


def test_removing_a_stale_errors_file_is_a_change(store):
    """Review finding 14: the errors file was removed without `changed` saying so."""
    files = _big_folder(store, 2, run_id=None, tokens=3)
    gone = FileError(id="p1/unreadable.flac", stage="discover", error="permission denied")
    assert merge_folder("p1", files, store, EXPECT, [gone]).changed
    assert store.read_bytes("p1.errors.jsonl") is not None
    report = merge_folder("p1", files, store, EXPECT)  # the JSONL is the same, the errors file goes
    assert report.changed and store.read_bytes("p1.errors.jsonl") is None
    assert not merge_folder("p1", files, store, EXPECT).changed

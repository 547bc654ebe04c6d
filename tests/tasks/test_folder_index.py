"""The per-folder index: a rerun costs O(folders + changed files) storage requests, not O(files).

Storage requests are counted on a real fsspec filesystem (the memory one, counting every GET,
PUT, HEAD, LIST and DELETE as an object store would bill them); the stages and merge run as the
flow runs them, on real FLAC files, against a loopback service speaking the service's contract.
"""

from __future__ import annotations

import json
import uuid

from tasks.discover import list_audio, make_batches
from tasks.folder_index import content_path, index_path, load_index, parse_content
from tasks.provenance import settings_sha256
from tasks.storage import Store
from tasks.tokenise import tokenise_batches
from tasks.transcribe import transcribe_files
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import (
    CountingMemoryFS,
    expect_for,
    make_corpus,
    read_jsonl,
    run_steps,
    settings_for,
    total_requests,
    write_clip,
)

FOLDERS = ("p1", "p2", "p3")


def rerun_requests(tmp_path, service: ContractService, per_folder: int) -> tuple[int, int, dict]:
    """(storage requests of an unchanged rerun, of a rerun after adding 2 files, the 2nd run's ops)."""
    audio = tmp_path / f"audio-{per_folder}"
    make_corpus(audio, dict.fromkeys(FOLDERS, per_folder))
    settings = settings_for(audio, f"countmem://results-{uuid.uuid4().hex[:8]}", service.url)
    store = Store(settings.results_root)
    expect = expect_for(settings)
    first = run_steps(settings, store, expect)
    assert sum(r.lines for r in first.folders.values()) == per_folder * len(FOLDERS)

    CountingMemoryFS.requests.clear()
    sent = len(service.requests)
    again = run_steps(settings, store, expect)
    unchanged, ops = total_requests(), dict(CountingMemoryFS.requests)
    assert len(service.requests) == sent  # nothing sent again
    assert again.stage("transcribe").reused == again.stage("tokenise").reused == per_folder * len(FOLDERS)
    assert not any(r.changed for r in again.folders.values())
    assert [r.new for r in again.folders.values()] == [0, 0, 0]

    write_clip(audio / "p2" / "p2_new_a.flac", 901)
    write_clip(audio / "p2" / "p2_new_b.flac", 902)
    CountingMemoryFS.requests.clear()
    grown = run_steps(settings, store, expect)
    assert len(service.requests) == sent + 2
    assert grown.folders["p2"].new == 2 and grown.folders["p2"].lines == per_folder + 2
    assert [f["id"] for f in read_jsonl(store, "p2.jsonl")][-2:] == ["p2/p2_new_a.flac", "p2/p2_new_b.flac"]
    return unchanged, total_requests(), ops


def test_a_rerun_costs_requests_per_folder_not_per_file(tmp_path):
    with ContractService() as service:
        small = rerun_requests(tmp_path, service, per_folder=4)
        large = rerun_requests(tmp_path, service, per_folder=12)
    # Unchanged: the same count for 12 files as for 3 folders x 4 files, and a few per folder:
    # one slim-index read per stage, then merge's slim-index read, its streamed reads of the
    # index content and of the JSONL (its ids and hash: nothing is written, no line vanished), a
    # read of the errors file (absent: no delete) and the two stats of its stamp. The flow's
    # planner skips even these for an unchanged folder (tests/tasks/test_settled.py); these are
    # the stages' and merge's own costs.
    assert small[0] == large[0] <= 8 * len(FOLDERS), (small, large)
    assert small[2] == {"get": 4 * len(FOLDERS), "open": 2 * len(FOLDERS), "head": 2 * len(FOLDERS)}, small[2]
    # Two new files in one folder cost a bounded number more (their intermediates: a failed
    # lookup, a write and merge's read, per stage; the folder's JSONL and index rewritten).
    assert small[1] == large[1] <= small[0] + 2 * 2 * 3 + 4, (small, large)


def test_results_from_a_run_that_never_merged_are_reused(tmp_path):
    """Stages find what the index does not list in the intermediates (one bulk read per folder):
    a run killed before its merge, or a results root from before the index, costs no re-work."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3, "p2": 2})
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        for folder in ("p1", "p2"):
            store.remove(index_path(folder))
        store.write_bytes(index_path("p2"), b'{"version": 1, "folder": "p2", "entr')  # torn
        sent = len(service.requests)
        again = run_steps(settings, store, expect)
        assert len(service.requests) == sent
        assert again.stage("tokenise").reused == 5 and again.folders["p1"].lines == 3
    index = load_index(store, "p1").index
    assert sorted(index.entries) == ["p1/p1_000.flac", "p1/p1_001.flac", "p1/p1_002.flac"]
    assert all(e.transcription and e.tokens for e in index.entries.values())


def test_the_index_is_rewritten_only_when_it_changes_and_lists_discovered_files_only(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3})
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        path = tmp_path / "results" / index_path("p1")
        stamp = path.stat().st_mtime_ns
        run_steps(settings, store, expect)
        assert path.stat().st_mtime_ns == stamp  # unchanged: not written
        (audio / "p1" / "p1_001.flac").unlink()
        run_steps(settings, store, expect)
    index = json.loads(path.read_text())
    assert index["folder"] == "p1" and sorted(index["entries"]) == ["p1/p1_000.flac", "p1/p1_002.flac"]
    entry = index["entries"]["p1/p1_000.flac"]
    assert entry["transcription"]["decode_fingerprint"] == "fp-openai-1"
    assert entry["tokens"]["settings_sha256"] == settings_sha256(expect.tokenizer_settings)
    content = list(parse_content((tmp_path / "results" / content_path("p1")).read_bytes()))
    assert [c.id for c in content] == ["p1/p1_000.flac", "p1/p1_002.flac"]


def test_an_index_claiming_another_folder_or_id_is_ignored(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes(index_path("p1"), json.dumps({"version": 1, "folder": "p2", "entries": {}}).encode())
    assert load_index(store, "p1").index.entries == {}
    good = load_index(store, "nothing-here")
    assert good.raw is None and good.index.folder == "nothing-here"


def test_stages_read_keys_only_never_text_or_tokens(tmp_path):
    """Review finding 1: every stage task read and parsed the folder's full records (text, tokens,
    quality) to decide reuse. Now a stage reads the slim index only: the same bytes for clips
    ten times longer (ten times the tokens), ~300 bytes a file."""
    per_clip_length = {}
    with ContractService() as service:
        for seconds in (0.4, 4.0):
            audio = tmp_path / f"audio-{seconds}"
            make_corpus(audio, {"p1": 6}, seconds=seconds)
            settings = settings_for(audio, f"countmem://results-{uuid.uuid4().hex[:8]}", service.url)
            store = Store(settings.results_root)
            expect = expect_for(settings)
            run_steps(settings, store, expect)
            files, _ = list_audio(settings.audio_root, settings.extensions)
            CountingMemoryFS.bytes_read.clear()
            CountingMemoryFS.requests.clear()
            assert transcribe_files(files, settings, store, expect).reused == 6
            assert tokenise_batches(make_batches(files, 4), settings, store, expect).reused == 6
            assert dict(CountingMemoryFS.requests) == {"get": 2}  # the slim index, once per stage
            (path, read), = CountingMemoryFS.bytes_read.items()
            assert path.endswith("/.index/p1.json")
            content = store.read_bytes(content_path("p1"))
            per_clip_length[seconds] = (read, len(content))
    (short, short_content), (long, long_content) = per_clip_length[0.4], per_clip_length[4.0]
    assert long_content > short_content + 6 * 300  # the content holds ~90 more tokens a file ...
    assert abs(long - short) <= 2 * 6 * 4  # ... the stages read none of it (sizes, mtimes: a few digits)
    assert long / (2 * 6) < 400, long  # ~310 bytes a file

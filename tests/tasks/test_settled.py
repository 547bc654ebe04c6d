"""The planner leaves alone exactly the folders a merge would not change (`tasks.settled`).

Each test writes real results with the stages and merge (`run_steps`), then plans a rerun the
way the flow does (`build_plan`) and checks which folders still get work: a folder is skipped
only while its files, this run's provenance, the output options and its outputs on storage are
what its last merge saw; every other change plans it again, and only it.
"""

from __future__ import annotations

import os
import uuid

from tasks.folder_index import index_path, load_index
from tasks.plan import build_plan, load_shard
from tasks.records import OutputOptions
from tasks.storage import Store
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import CountingMemoryFS, expect_for, make_corpus, run_steps, settings_for, write_clip

FOLDERS = {"p1": 3, "p2": 3, "p3": 2}


def planned_folders(settings, expect) -> tuple[set[str], list]:
    """Folders the plan gives work (shards or merges), and the reports of those it leaves alone."""
    plan, _, settled = build_plan(settings, expect, "tiny.en", n_workers=1, run_id=f"20260101T000000Z-{uuid.uuid4().hex[:8]}")
    in_shards = {b.folder for i in range(plan.shards) for b in load_shard(plan.location, i).batches}
    assert plan.settled_folders == len(settled) and plan.settled_files == sum(r.files for r in settled)
    assert len(in_shards) + len(settled) == plan.folders  # each folder planned or left alone, never both
    return in_shards, settled


def test_unchanged_folders_get_no_work_and_their_reports_come_from_the_stamp(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, FOLDERS)
    with ContractService(flags={"p2_001.flac": ["repetition"]}) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        expect = expect_for(settings)
        first = run_steps(settings, Store(settings.results_root), expect)
        todo, settled = planned_folders(settings, expect)
    assert todo == set()
    for report in settled:
        merged = first.folders[report.folder]
        assert report.model_dump(exclude={"changed", "new"}) == merged.model_dump(exclude={"changed", "new"})
        assert (report.changed, report.new) == (False, 0)
    p2 = next(r for r in settled if r.folder == "p2")
    assert p2.flagged == 1 and p2.worst[0]["id"] == "p2/p2_001.flac"


def test_each_change_plans_its_folder_again_and_only_it(tmp_path):
    audio, results = tmp_path / "audio", tmp_path / "results"
    make_corpus(audio, FOLDERS)
    with ContractService() as service:
        settings = settings_for(audio, str(results), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)

        write_clip(audio / "p1" / "p1_new.flac", 77)  # a file added
        (audio / "p2" / "p2_000.flac").unlink()  # a file removed
        (results / "p3.jsonl").write_text((results / "p3.jsonl").read_text()[:-1] + " \n")  # an output edited
        assert planned_folders(settings, expect)[0] == {"p1", "p2", "p3"}
        run_steps(settings, store, expect)
        assert planned_folders(settings, expect)[0] == set()

        write_clip(audio / "p2" / "p2_001.flac", 78)  # a file's audio replaced
        (results / "p3.jsonl").unlink()  # an output deleted
        assert planned_folders(settings, expect)[0] == {"p2", "p3"}
        run_steps(settings, store, expect)
        assert planned_folders(settings, expect)[0] == set()

        stamp = os.stat(audio / "p1" / "p1_000.flac")  # touched: same bytes, a new mtime
        os.utime(audio / "p1" / "p1_000.flac", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000_000))
        assert planned_folders(settings, expect)[0] == {"p1"}
        run_steps(settings, store, expect)

        # What every folder depends on: the output options, the decode fingerprint, the tokeniser.
        quality = settings.model_copy(update={"with_quality": True})
        assert planned_folders(quality, expect)[0] == set(FOLDERS)
        other_model = expect.model_copy(update={"decode_fingerprint": "fp-other"})
        assert planned_folders(settings, other_model)[0] == set(FOLDERS)
        other_tokens = expect.model_copy(update={"tokenizer_settings": {**expect.tokenizer_settings, "seed": 9}})
        assert planned_folders(settings, other_tokens)[0] == set(FOLDERS)
        no_identity = expect.model_copy(update={"decode_fingerprint": None})  # no reuse without a model identity
        assert planned_folders(settings, no_identity)[0] == set(FOLDERS)
        assert planned_folders(settings, expect)[0] == set()


def test_a_folder_with_a_failed_file_is_never_left_alone(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2, "p2": 2})
    (audio / "p2" / "p2_bad.flac").write_bytes(b"not audio at all")
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        first = run_steps(settings, store, expect)
        assert [e.id for e in first.folders["p2"].errors] == ["p2/p2_bad.flac"]
        assert load_index(store, "p2").index.merged is None and load_index(store, "p1").index.merged is not None
        for _ in range(2):  # every run retries it
            assert planned_folders(settings, expect)[0] == {"p2"}
            run_steps(settings, store, expect)


def test_clips_dropped_as_flagged_stay_reported_while_settled(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3})
    with ContractService(flags={"p1_002.flac": ["repetition"]}) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url, drop_flagged=True)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        first = run_steps(settings, store, expect, OutputOptions(drop_flagged=True))
        todo, settled = planned_folders(settings, expect)
    assert todo == set() and [e.stage for e in first.folders["p1"].errors] == ["quality"]
    assert settled[0].errors == first.folders["p1"].errors and settled[0].errors_jsonl is not None
    assert settled[0].lines == 2


def test_planning_an_unchanged_rerun_costs_three_requests_per_folder_on_an_object_store(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {f"s{k}": 4 for k in range(6)})
    with ContractService() as service:
        settings = settings_for(audio, f"countmem://settled-{uuid.uuid4().hex[:8]}", service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        CountingMemoryFS.requests.clear()
        plan, _, settled = build_plan(settings, expect, "tiny.en", n_workers=1, run_id="20260101T000000Z-0000abcd")
    assert (plan.shards, plan.groups, len(settled)) == (0, [], 6)
    ops = dict(CountingMemoryFS.requests)
    # Per folder: its slim index (one bulk read) and two stats (JSONL, errors file); then plan.json.
    assert ops.pop("get") == 6 and ops.pop("head") == 2 * 6, ops
    assert ops.pop("put") == 1 and not ops, ops
    assert store.read_bytes(index_path("s0")) is not None

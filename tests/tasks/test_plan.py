"""The run plan on storage: built once, small, read back by reference; old plans pruned; owners kept."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.ownership import ForeignResultsRootError, check_owner
from tasks.plan import KEEP_RUNS, RUNS_DIR, build_plan, group_files, load_group, load_plan, load_shard, prune_runs
from tasks.preflight import RunNotStartedError, check_roots, probe_results_root, settings_or_error
from tasks.records import Provenance
from tasks.settings import PipelineSettings

CLIP = Path(__file__).parents[2] / "flows" / "demo_data" / "audio" / "p225" / "p225_001_mic2.flac"
PROVENANCE = Provenance(decode_fingerprint="abc", language=None, tokenizer_settings={"name": "simulated"})


def hard_link_corpus(root: Path, folders: int, per_folder: int) -> None:
    for k in range(folders):
        (root / f"s{k:03d}").mkdir(parents=True)
        for i in range(per_folder):
            os.link(CLIP, root / f"s{k:03d}" / f"s{k:03d}_{i:04d}.flac")


def test_plan_is_written_once_and_read_back_by_reference(tmp_path):
    hard_link_corpus(tmp_path / "audio", folders=30, per_folder=100)
    (tmp_path / "audio" / "s001" / "broken.flac").symlink_to(tmp_path / "nowhere.flac")
    settings = PipelineSettings(audio_root=str(tmp_path / "audio"), results_root=str(tmp_path / "results"),
                                shard_max_files=256, merge_max_tasks=8, service_token="secret-token")
    plan, refused, _ = build_plan(settings, PROVENANCE, "tiny.en", n_workers=1, run_id="20260101T000000Z-0000abcd")
    assert refused == []
    assert (plan.files, plan.folders, len(plan.groups)) == (3000, 30, 8)
    assert 12 <= plan.shards <= 13  # 3,000 files in shards of <= 256 (batches of 32 are never split)
    raw = (tmp_path / "results" / RUNS_DIR / plan.run_id / "plan.json").read_bytes()
    assert len(raw) < 8_000  # O(groups + shards), not O(files)
    assert b"secret-token" not in raw and "service_token" not in json.loads(raw)["settings"]
    assert load_plan(plan.location) == plan
    shards = [load_shard(plan.location, i) for i in range(plan.shards)]
    assert all(s.n_files <= 256 for s in shards)
    assert sorted(f.id for s in shards for b in s.batches for f in b.files) == sorted(
        p.relative_to(tmp_path / "audio").as_posix() for p in (tmp_path / "audio").rglob("s*.flac"))
    seen: list[str] = []
    for ref in plan.groups:
        group = load_group(plan.location, ref.index)
        files, shards_of = group_files(plan, group)
        assert set(files) == set(group.folders) and ref.files == sum(map(len, files.values()))
        assert all(set(shards_of[f]) <= set(ref.shards) for f in group.folders)
        seen += [f.id for folder in group.folders for f in files[folder]]
        if "s001" in group.folders:
            assert [e.id for e in group.errors] == ["s001/broken.flac"]
    assert len(seen) == len(set(seen)) == 3000


def test_old_plans_are_pruned(tmp_path):
    runs = tmp_path / RUNS_DIR
    names = [f"2026010{d}T000000Z-0000abcd" for d in range(1, 9)]
    for name in names:
        (runs / name).mkdir(parents=True)
    (runs / "not-a-run").mkdir()
    removed = prune_runs(str(tmp_path), current=names[0])
    assert removed == names[1 : 8 - KEEP_RUNS]
    assert sorted(p.name for p in runs.iterdir()) == sorted([names[0], *names[-KEEP_RUNS:], "not-a-run"])


def test_a_results_root_belongs_to_one_audio_root(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = str(tmp_path / "results")
    check_owner(results, str(tmp_path / "a"), claim=True)
    monkeypatch.chdir(tmp_path)
    check_owner(results, "a/", claim=True)  # the same root spelled differently
    check_owner("results", "./a")
    with pytest.raises(ForeignResultsRootError, match=r"holds the results of audio root .*/a'.*delete .*_owner\.json"):
        check_owner(results, str(tmp_path / "b"), claim=True)


def test_checks_that_stop_a_run_before_any_work(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "a-file").write_text("x")

    def check(**values):
        with pytest.raises(RunNotStartedError) as e:
            check_roots(settings_or_error(**values))
        return str(e.value)

    assert "audio root not found" in check(audio_root=str(tmp_path / "missing"))
    assert "not writable" in check(audio_root=str(tmp_path / "audio"), results_root=str(tmp_path / "a-file" / "r"))
    assert "outside the allowed roots" in check(audio_root=str(tmp_path / "audio"), allowed_roots=["/nowhere"])
    assert "bad settings: batch_size" in str(pytest.raises(RunNotStartedError, settings_or_error,
                                                           audio_root="x", batch_size=0).value)
    probe_results_root(str(tmp_path / "new" / "results"))
    assert not (tmp_path / "new").exists()  # the probe leaves nothing behind


def test_the_probe_removes_only_the_empty_folders_it_made(tmp_path, monkeypatch):
    """Two first runs at once: one run's probe must not delete the folder in which the other has
    just written its owner claim (it removed the whole tree it had created, files and all)."""
    import tasks.preflight as preflight

    results = tmp_path / "new" / "results"
    real_remove = preflight.Store.remove

    def the_other_run_claims_meanwhile(store, relative):
        real_remove(store, relative)
        (results / "_owner.json").write_text("{}")  # the other run, between our write and cleanup

    monkeypatch.setattr(preflight.Store, "remove", the_other_run_claims_meanwhile)
    probe_results_root(str(results))
    assert (results / "_owner.json").exists()

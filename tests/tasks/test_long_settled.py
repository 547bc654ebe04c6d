"""Folders holding long recordings settle like any other when nothing changed (`tasks.settled`);
a changed segmentation option plans again only the folders with long files, and re-segments
only the long files (issue 22).

Real espeak-ng FLAC, the real service, the simulated tokeniser; the flow's steps in process
(`run_plan`), and the planner asked as the flow asks it (`build_plan`).
"""

from __future__ import annotations

import shutil
import uuid

import pytest

from tasks.plan import build_plan, load_group, load_shard
from tasks.records import SegmentList
from tasks.segments import segment_list_path
from tasks.settings import PipelineSettings, SegmentOptions
from tasks.storage import Store
from tests.conftest import DEMO_AUDIO
from tests.fixtures.longform import make_long_recording
from tests.metrics import transcribe_requests
from tests.tasks.steps import SIMULATED, expect_for, read_jsonl
from tests.tasks.test_longform_stages import run_plan

LONG = "book/ch01.flac"


def plan_of(settings: PipelineSettings):
    """(folders given work, settled reports by folder, the plan) for a rerun planned now."""
    plan, _, settled = build_plan(settings, expect_for(settings), "tiny.en", n_workers=1,
                                  run_id=f"20260101T000000Z-{uuid.uuid4().hex[:8]}")
    todo = {b.folder for i in range(plan.shards) for b in load_shard(plan.location, i).batches}
    todo |= {f for g in plan.groups for f in load_group(plan.location, g.index).folders}
    return todo, {r.folder: r for r in settled}, plan


def ids(store: Store, folder: str) -> list[str]:
    return [x["id"] for x in read_jsonl(store, f"{folder}.jsonl")]


def listing(store: Store) -> SegmentList:
    return SegmentList.model_validate_json(store.read_bytes(segment_list_path(LONG)))


@pytest.mark.slow
def test_a_folder_with_long_files_settles_and_only_segmentation_changes_unsettle_it(tmp_path, whisper_service_url):
    audio = tmp_path / "audio"
    make_long_recording(audio / LONG, 40, seed=61)
    for file_id in ("book/intro.flac", "p225/p225_001_mic2.flac"):
        (audio / file_id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO_AUDIO / "p225/p225_001_mic2.flac", audio / file_id)
    settings = PipelineSettings(audio_root=str(audio), results_root=str(tmp_path / "results"),
                                service_url=whisper_service_url, http_retries=0, **SIMULATED)
    store = Store(settings.results_root)
    merged = {r.folder: r for r in run_plan(settings)}
    first = ids(store, "book")
    assert len(first) >= 3 and merged["book"].segments == len(first) - 1
    assert (merged["book"].files, merged["book"].new, merged["book"].lines) == (2, 2, len(first))  # audio files

    # Nothing changed: no VAD task, no shard, no merge; the reports are the merge's, from the stamp.
    todo, settled, plan = plan_of(settings)
    assert (todo, sorted(settled), plan.segment_tasks, plan.shards) == (set(), ["book", "p225"], 0, 0)
    run_only = {"changed", "new"}
    assert settled["book"].model_dump(exclude=run_only) == merged["book"].model_dump(exclude=run_only)
    assert settled["book"].segments == len(first) - 1 and settled["book"].segment_durations
    # A threshold that leaves every file on the side it was on changes no line: still settled.
    assert plan_of(settings.model_copy(update={"segmentation": SegmentOptions(segment_over_s=35.0)}))[0] == set()

    # A cutting option: only the folder with a long file is planned, only the long file re-cut,
    # only segments not transcribed before are sent (the short clips are not).
    cut = settings.model_copy(update={"segmentation": SegmentOptions(max_segment_s=12.0, min_segment_s=4.0)})
    todo, settled, plan = plan_of(cut)
    assert (todo, sorted(settled), plan.segment_tasks) == ({"book"}, ["p225"], 1)
    old = listing(store)
    before = transcribe_requests(whisper_service_url)
    run_plan(cut)
    recut = ids(store, "book")
    assert listing(store).run_id != old.run_id and listing(store).fingerprint != old.fingerprint
    assert transcribe_requests(whisper_service_url) - before == len(set(recut) - set(first)) > 0
    assert plan_of(cut)[0] == set()  # and settled again

    # --segment-over above the file's length: the file is whole again (one request), the other
    # files untouched; back to the threshold it had, its segments and their results are reused.
    whole = cut.model_copy(update={"segmentation": cut.segmentation.model_copy(update={"segment_over_s": 60.0})})
    assert plan_of(whole)[0] == {"book"}
    before = transcribe_requests(whisper_service_url)
    run_plan(whole)
    assert transcribe_requests(whisper_service_url) - before == 1
    assert ids(store, "book") == ["book/ch01.flac", "book/intro.flac"]
    assert plan_of(whole)[0] == set()
    recut_listing = store.read_bytes(segment_list_path(LONG))
    before = transcribe_requests(whisper_service_url)
    assert plan_of(cut)[0] == {"book"}
    run_plan(cut)
    assert transcribe_requests(whisper_service_url) - before == 0
    assert ids(store, "book") == recut and store.read_bytes(segment_list_path(LONG)) == recut_listing
    assert plan_of(cut)[0] == set()

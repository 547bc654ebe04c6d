"""Scale: the flow over 5,000 files, with every Prefect parameter a few KB (issue 11).

Before the run plan lived on storage, Prefect refused the subflow run at ~3,000 files (`422 Flow
run parameters must be less than 524,288 bytes`): every shard and id travelled as a parameter.
Silent one-second clips (hard links of one FLAC) never reach the Whisper model, and the
`simulated` tokeniser is cheap. What is asserted is counted (requests, task runs, parameter
bytes), never timed: the wall time of the same corpus is `bench/scale.py --sizes 5000` (issue 19).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

from flows.pipeline import parallel_transcribe_tokenise, summary_of
from tests.metrics import transcribe_requests

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

FOLDERS, PER_FOLDER = 50, 100
FILES = FOLDERS * PER_FOLDER
PARAMETER_LIMIT = 4_096  # bytes of JSON per flow run or task run, whatever the corpus size


def silent_corpus(root, folders: int, per_folder: int) -> None:
    """`folders` x `per_folder` hard links of one silent 1 s FLAC, VCTK layout."""
    root.mkdir(parents=True)
    clip = root / "silence.flac.src"
    sf.write(clip, np.zeros(16_000, np.float32), 16_000, format="FLAC")
    for k in range(folders):
        speaker = root / f"s{k:03d}"
        speaker.mkdir()
        for i in range(per_folder):
            os.link(clip, speaker / f"s{k:03d}_{i:04d}_mic1.flac")


def run(audio, results, url):
    """The flow over `audio` (simulated tokeniser, one worker): its final state."""
    return parallel_transcribe_tokenise(
        audio_root=str(audio), results_root=str(results), service_url=url,
        tokenizer="simulated", n_workers=1, return_state=True,
    )


def runs_of(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
    return flow_run, task_runs


def test_five_thousand_files_with_small_parameters(tmp_path, whisper_service_url):
    audio, results = tmp_path / "audio", tmp_path / "results"
    silent_corpus(audio, FOLDERS, PER_FOLDER)
    before = transcribe_requests(whisper_service_url)
    state = run(audio, results, whisper_service_url)
    summary = summary_of(state)
    assert state.is_completed(), state.message
    assert (summary.files, summary.lines, summary.failed) == (FILES, FILES, 0), summary.errors[:3]
    assert transcribe_requests(whisper_service_url) - before == FILES
    ids = set()
    for k in range(FOLDERS):
        lines = [json.loads(x) for x in (results / f"s{k:03d}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in lines] == [f"s{k:03d}/s{k:03d}_{i:04d}_mic1.flac" for i in range(PER_FOLDER)]
        ids |= {r["id"] for r in lines}
    assert len(ids) == FILES

    flow_run, task_runs = runs_of(state.state_details.flow_run_id)
    assert len(json.dumps(flow_run.parameters)) < PARAMETER_LIMIT
    assert task_runs, "no task runs recorded on the run users open"
    for task_run in task_runs:
        inputs = json.dumps({k: [i.model_dump(mode="json") for i in v] for k, v in task_run.task_inputs.items()})
        assert len(inputs) < PARAMETER_LIMIT, (task_run.name, len(inputs))
    names = sorted(t.name for t in task_runs)
    stage_runs = [n for n in names if n.startswith(("transcribe-shard-", "tokenise-shard-"))]
    assert 2 <= len(stage_runs) <= 2 * (FILES // 1024 + 4)  # shards, not files
    assert len([n for n in names if n.startswith("merge-")]) <= 64
    print(f"{FILES} files: {len(task_runs)} task runs")

    # 10 new files in one folder: only that folder gets work (one shard, one merge: 3 task runs).
    clip = audio / "silence.flac.src"
    for i in range(PER_FOLDER, PER_FOLDER + 10):
        os.link(clip, audio / "s007" / f"s007_{i:04d}_mic1.flac")
    before = transcribe_requests(whisper_service_url)
    state = run(audio, results, whisper_service_url)
    summary = summary_of(state)
    assert (summary.files, summary.lines, summary.new, summary.failed) == (FILES + 10, FILES + 10, 10, 0)
    assert transcribe_requests(whisper_service_url) - before == 10
    assert len((results / "s007.jsonl").read_text().splitlines()) == PER_FOLDER + 10
    _, task_runs = runs_of(state.state_details.flow_run_id)
    assert sorted(t.name for t in task_runs) == ["merge-s007", "tokenise-shard-0", "transcribe-shard-0"]
    print(f"rerun with 10 new files: {len(task_runs)} task runs")

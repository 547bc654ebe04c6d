"""End to end: the real flow on a real Prefect harness, a real Dask cluster and the real service."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

from flows.demo import free_port
from flows.pipeline import parallel_transcribe_tokenise, summary_of
from tests.conftest import DEMO_AUDIO, DEMO_REFERENCES
from tests.metrics import transcribe_requests
from tests.wer import wer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_lines(results: Path) -> dict[str, dict]:
    lines = {}
    for p in sorted(results.rglob("*.jsonl")):
        if p.name.endswith(".errors.jsonl"):
            continue
        for record in read_jsonl(p):
            assert record["id"] not in lines, f"{record['id']} appears twice"
            lines[record["id"]] = record
    return lines


def run_flow(audio: Path, results: Path, url: str, **kwargs):
    return parallel_transcribe_tokenise(
        audio_root=str(audio), results_root=str(results), service_url=url, n_workers=1, **kwargs
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, whisper_service_url):
    results = tmp_path_factory.mktemp("results")
    before = transcribe_requests(whisper_service_url)
    summary = run_flow(DEMO_AUDIO, results, whisper_service_url, batch_size=4)
    return summary, results, transcribe_requests(whisper_service_url) - before


def test_demo_corpus_end_to_end(demo_run):
    summary, results, requests = demo_run
    references = json.loads(DEMO_REFERENCES.read_text())
    assert summary.failed == 0 and summary.lines == len(references) == requests
    assert sorted(p.name for p in results.glob("*.jsonl")) == ["p225.jsonl", "p226.jsonl", "p227.jsonl", "p228.jsonl"]
    for folder in ["p225", "p226", "p227", "p228"]:
        ids = [r["id"] for r in read_jsonl(results / f"{folder}.jsonl")]
        assert ids == sorted(i for i in references if i.startswith(folder + "/"))
    lines = all_lines(results)
    assert set(lines) == set(references)
    assert wer([references[i] for i in sorted(lines)], [lines[i]["transcription"] for i in sorted(lines)]) <= 0.25
    for file_id, record in lines.items():
        seconds = sf.info(str(DEMO_AUDIO / file_id)).duration
        tokens = record["token_array"]
        assert abs(len(tokens) - 25 * seconds) <= 1, file_id
        assert all(isinstance(t, int) and 0 <= t < 8192 for t in tokens)
    assert (results / "transcriptions" / "p225" / "p225_001_mic2.json").exists()
    assert (results / "tokens" / "p225" / "p225_001_mic2.json").exists()


def test_rerun_reuses_everything(demo_run, whisper_service_url):
    summary, results, _ = demo_run
    before_bytes = {p.name: p.read_bytes() for p in results.glob("*.jsonl")}
    before_mtimes = {p.name: p.stat().st_mtime_ns for p in results.glob("*.jsonl")}
    before = transcribe_requests(whisper_service_url)
    state = run_flow(DEMO_AUDIO, results, whisper_service_url, batch_size=4, return_state=True)
    again = summary_of(state)
    assert transcribe_requests(whisper_service_url) == before
    assert {p.name: p.read_bytes() for p in results.glob("*.jsonl")} == before_bytes
    assert {p.name: p.stat().st_mtime_ns for p in results.glob("*.jsonl")} == before_mtimes  # not rewritten
    assert (again.files, again.lines, again.new, again.audio_hours) == (summary.files, summary.lines, 0, summary.audio_hours)
    # Nothing changed, so nothing was scheduled: no task run, and no Dask cluster started.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_runs == []


def test_changed_tokeniser_redoes_tokens_only(demo_run, whisper_service_url, tmp_path):
    _, results, _ = demo_run
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    (copy / "p999.jsonl").write_text('{"id": "p999/gone.flac"}\n')  # a speaker removed from the audio
    before = transcribe_requests(whisper_service_url)
    summary = run_flow(DEMO_AUDIO, copy, whisper_service_url, tokenizer="simulated")
    assert transcribe_requests(whisper_service_url) == before
    assert summary.failed == 0
    assert summary.stale_folders == ["p999"] and (copy / "p999.jsonl").exists()  # reported, kept
    tokens = json.loads((copy / "tokens" / "p225" / "p225_001_mic2.json").read_text())
    assert tokens["tokenizer"] == "simulated"


def test_same_names_in_two_folders_and_nested_folders(tmp_path, whisper_service_url):
    audio = tmp_path / "audio"
    clips = sorted(DEMO_AUDIO.rglob("*.flac"))
    for rel, clip in [("a/x.flac", clips[0]), ("b/x.flac", clips[5]), ("b/deep/er/x.flac", clips[10])]:
        (audio / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, audio / rel)
    summary = run_flow(audio, tmp_path / "results", whisper_service_url)
    assert summary.failed == 0
    lines = all_lines(tmp_path / "results")
    assert set(lines) == {"a/x.flac", "b/x.flac", "b/deep/er/x.flac"}
    assert len({tuple(r["token_array"]) for r in lines.values()}) == 3  # three different clips
    assert (tmp_path / "results" / "b" / "deep" / "er.jsonl").exists()


def test_unreachable_service_fails_fast(tmp_path):
    from tasks.preflight import RunNotStartedError

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RunNotStartedError, match=f"{dead}.*audio-pipeline serve") as refused:
        run_flow(DEMO_AUDIO, tmp_path / "results", dead)
    assert "not ready after" not in str(refused.value)  # refused at once, not waited out
    assert not (tmp_path / "results").exists()


@contextlib.contextmanager
def dask_cluster(cwd: Path, workers: int) -> Iterator[str]:
    """A real `dask scheduler` and `workers` `dask worker` processes on loopback; yields its address."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bindir = Path(sys.executable).parent
    procs = [subprocess.Popen([bindir / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", ":0", "--no-show"], cwd=cwd)]
    try:
        for _ in range(workers):  # started the way README tells users to start theirs
            procs.append(subprocess.Popen([bindir / "dask", "worker", address, "--nthreads", "2",
                                           "--no-dashboard", "--host", "127.0.0.1", "--preload", "tasks.worker"],
                                          cwd=Path(__file__).parents[2]))
        from distributed import Client

        with Client(address, timeout=60) as client:  # also: the scheduler is up
            if workers:
                client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def dask_cluster_address(tmp_path) -> Iterator[str]:
    with dask_cluster(tmp_path, workers=1) as address:
        yield address


def test_existing_dask_scheduler(demo_run, dask_cluster_address, whisper_service_url, tmp_path):
    """Both stages and the merges run on the user's cluster and give the local run's bytes.

    Three speakers' transcriptions are seeded from the local run (reuse is tested above), so the
    cluster's workers send only p228's five requests: the HTTP path from remote workers, cheaply."""
    _, reference_results, _ = demo_run
    results = tmp_path / "results"
    for folder in ("p225", "p226", "p227"):
        shutil.copytree(reference_results / "transcriptions" / folder, results / "transcriptions" / folder)
    before = transcribe_requests(whisper_service_url)
    summary = parallel_transcribe_tokenise(
        audio_root=str(DEMO_AUDIO), results_root=str(results),
        service_url=whisper_service_url, dask_address=dask_cluster_address, batch_size=4,
    )
    assert summary.failed == 0
    assert transcribe_requests(whisper_service_url) - before == len(list((DEMO_AUDIO / "p228").glob("*.flac")))
    for p in reference_results.glob("*.jsonl"):
        assert (results / p.name).read_bytes() == p.read_bytes()


def test_cluster_without_workers_is_given_up_on_not_waited_for_forever(tmp_path, whisper_service_url, monkeypatch):
    """Regression: with every worker gone, Dask keeps tasks queued and the run hung silently.
    Now, after AUDIO_PIPELINE_NO_WORKERS_TIMEOUT_S, the files are reported failed, the folders
    are merged in the flow's own process, and the run returns."""
    monkeypatch.setenv("AUDIO_PIPELINE_NO_WORKERS_TIMEOUT_S", "3")
    audio = tmp_path / "audio"
    shutil.copytree(DEMO_AUDIO / "p225", audio / "p225")
    before = transcribe_requests(whisper_service_url)
    with dask_cluster(tmp_path, workers=0) as address:
        state = parallel_transcribe_tokenise(audio_root=str(audio), results_root=str(tmp_path / "results"),
                                             service_url=whisper_service_url, dask_address=address, return_state=True)
    summary = summary_of(state)
    files = sorted(p.relative_to(audio).as_posix() for p in audio.rglob("*.flac"))
    assert (summary.files, summary.lines, summary.failed) == (len(files), 0, len(files))
    assert state.is_failed() and state.message.startswith(f"{len(files)} of {len(files)} files failed")
    errors = read_jsonl(tmp_path / "results" / "p225.errors.jsonl")
    assert {e["id"] for e in errors} == set(files)
    # the reason is the stage tasks' fate, not "no result was produced"
    assert all("had no workers" in e["error"] for e in errors), errors[:2]
    assert transcribe_requests(whisper_service_url) == before  # nothing ran anywhere

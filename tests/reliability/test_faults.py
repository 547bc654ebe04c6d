"""Faults: the service down or killed, the flow process SIGKILLed, a Dask worker killed, two runs at once.

Each test starts what it kills (service subprocess, CLI subprocess, Dask worker) on 127.0.0.1,
bounds every wait, and cleans up. Request counts come from the service's /metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from flows.demo import free_port
from flows.pipeline import parallel_transcribe_tokenise, summary_of
from tasks.tokenisers import get_tokeniser
from tests.conftest import DEMO_AUDIO, DEMO_REFERENCES
from tests.metrics import requests_in_progress, transcribe_requests
from tests.reliability.conftest import (
    AUTH,
    TOKEN,
    answered,
    cli_env,
    kill_group,
    read_results,
    run_cli,
    start_cli,
    transcription_ids,
    wait_until,
)
from tests.wer import wer
from whisper_service.audio import decode_audio

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

REFERENCES: dict[str, str] = json.loads(DEMO_REFERENCES.read_text())


def settled_requests(url: str, quiet_s: float = 2.0, timeout_s: float = 60) -> int:
    """The service's transcription count once it has stopped moving (in-flight requests done)."""
    last, since = transcribe_requests(url), time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} kept receiving requests for {timeout_s} s")
        time.sleep(0.2)
        now = transcribe_requests(url)
        if now != last:
            last, since = now, time.monotonic()
    return last


def drained_requests(url: str, timeout_s: float = 300) -> int:
    """The count once every request still open from a killed client is answered.

    The service's in-progress gauge says when none is left (a silent probe was not enough: the
    service answers silence without queueing it, ahead of a slow batch still in the engine).
    """
    deadline = time.monotonic() + timeout_s
    while requests_in_progress(url):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} still had requests in progress after {timeout_s} s")
        time.sleep(0.2)
    return settled_requests(url)


def copy_demo(dest: Path, folders: tuple[str, ...] = ("p225", "p226", "p227", "p228")) -> list[str]:
    for folder in folders:
        shutil.copytree(DEMO_AUDIO / folder, dest / folder)
    return sorted(i for i in REFERENCES if i.split("/")[0] in folders)


def assert_good_lines(lines: dict[str, dict], ids: list[str]) -> None:
    assert sorted(lines) == ids
    score = wer([REFERENCES[i] for i in ids], [lines[i]["transcription"] for i in ids])
    assert score <= 0.25, score
    assert all(lines[i]["token_array"] for i in ids)


# --- (a) service not reachable at start ---


def test_cli_fails_fast_when_the_service_is_down(tmp_path, prefect_api_url):
    dead = f"http://127.0.0.1:{free_port()}"
    code, output = run_cli(["run", str(DEMO_AUDIO), "--results", str(tmp_path / "results"), "--service-url", dead],
                           cli_env(prefect_api_url), tmp_path / "cli.log", timeout_s=180)
    assert code == 2, output
    assert f"error: Whisper service not reachable at {dead}" in output
    assert "audio-pipeline serve --port" in output and "--service-url" in output
    assert f"not reachable at {dead} (ConnectError)" in output and "not ready after" not in output  # not waited out
    assert not (tmp_path / "results").exists()  # nothing was scheduled


# --- (b) service killed in the middle of a run ---


def test_service_killed_mid_run_then_rerun_finishes_exactly_the_missing(
    token_service, dask_cluster, tmp_path, monkeypatch
):
    service = token_service  # token-protected: the pipeline sends AUDIO_PIPELINE_SERVICE_TOKEN
    monkeypatch.setenv("AUDIO_PIPELINE_SERVICE_TOKEN", TOKEN)
    # One request in flight per task, short backoff: the kill lands mid-run and retries end soon.
    monkeypatch.setenv("AUDIO_PIPELINE_HTTP_CONCURRENCY", "1")
    monkeypatch.setenv("AUDIO_PIPELINE_HTTP_BACKOFF_S", "0.2")
    results = tmp_path / "results"
    ids = sorted(REFERENCES)
    killed_at: list[float] = []

    before = answered(service.url, AUTH)  # the module's service may have answered earlier tests

    def kill_after_some_requests() -> None:
        wait_until(lambda: answered(service.url, AUTH) >= before + 5, 240, "5 transcriptions", 0.05)
        service.kill()
        killed_at.append(time.monotonic())

    def run():
        return parallel_transcribe_tokenise(
            audio_root=str(DEMO_AUDIO), results_root=str(results), service_url=service.url,
            tokenizer="simulated", batch_size=2, dask_address=dask_cluster["address"], return_state=True,
        )

    killer = threading.Thread(target=kill_after_some_requests, daemon=True)
    killer.start()
    state = run()
    summary = summary_of(state)
    assert state.is_failed() and "files failed" in state.message  # the run says so: an alert can fire
    killer.join(timeout=5)
    assert killed_at, "the service was never killed: the run finished too fast to test this"
    done = transcription_ids(results)
    lines, errors = read_results(results)
    # the run completed: files transcribed before the kill have lines, the rest are recorded as failed
    assert 5 <= len(done) < len(ids)
    assert set(lines) == done and summary.lines == len(done)
    assert {e["id"] for e in errors} == set(ids) - done and summary.failed == len(ids) - len(done)
    for e in errors:  # retries are bounded: each file gave up after http_retries + 1 attempts
        assert e["stage"] == "transcribe" and f"{service.url}/transcribe failed after 4 attempts" in e["error"], e

    service.start()  # the same port, fresh counters
    service.wait_ready()
    again = run()
    assert answered(service.url, AUTH) == len(ids) - len(done)  # exactly the missing files
    assert again.is_completed() and summary_of(again).failed == 0
    final, errors = read_results(results)
    assert errors == [] and not list(results.glob("*.errors.jsonl"))
    assert_good_lines(final, ids)
    assert all(final[i] == lines[i] for i in done)  # earlier results kept as they were


# --- (c) the flow process SIGKILLed mid-run ---


def test_flow_process_sigkilled_mid_run_leaves_no_torn_output_and_rerun_resumes(
    whisper_service_url, prefect_api_url, dask_cluster, tmp_path
):
    audio, results = tmp_path / "audio", tmp_path / "results"
    ids = copy_demo(audio)
    # A previous run's complete output: the kill must leave it whole or replace it whole.
    previous = "".join(json.dumps({"id": i, "transcription": "previous run", "token_array": [1]}) + "\n"
                       for i in ids if i.startswith("p225/")).encode()
    results.mkdir()
    (results / "p225.jsonl").write_bytes(previous)
    env = cli_env(prefect_api_url, AUDIO_PIPELINE_HTTP_CONCURRENCY="1",
                  AUDIO_PIPELINE_TOKENIZER_OPTIONS=json.dumps({"delay_s": 1.0}))
    args = ["run", str(audio), "--results", str(results), "--service-url", whisper_service_url,
            "--batch-size", "2", "--tokenizer", "simulated"]

    # Its own LocalCluster (--workers 1): worker processes that die with it, mid-write or not.
    proc = start_cli([*args, "--workers", "1"], env, tmp_path / "killed.log")
    try:
        wait_until(lambda: len(list((results / "transcriptions").rglob("*.json"))) >= 3, 240,
                   "3 transcription intermediates")
        family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)  # the flow process only, as the OOM killer would
        proc.wait(timeout=30)
        # its Dask workers notice the parent is gone and exit by themselves
        wait_until(lambda: not any(map(alive, family)), 60, "the killed run's Dask workers to exit")
    finally:
        kill_group(proc)

    # No torn JSONL: each is absent, the previous complete version, or a complete new one.
    lines, errors = read_results(results)
    assert errors == []
    for folder in {i.split("/")[0] for i in lines}:
        assert sorted(i for i in lines if i.startswith(folder + "/")) == [i for i in ids if i.startswith(folder + "/")]
    p225 = (results / "p225.jsonl").read_bytes()
    assert p225 == previous or "previous run" not in p225.decode()
    leftovers = [p for p in results.rglob("*") if p.is_file() and ".tmp-" in p.name]
    assert all(p.name.startswith(".tmp-") and p.suffix == ".part" for p in leftovers), leftovers

    have = transcription_ids(results)
    assert len(have) < len(ids), "the run finished before it was killed"
    kept = {p: p.stat().st_mtime_ns for p in (results / "transcriptions").rglob("*.json")}
    before = drained_requests(whisper_service_url)
    code, output = run_cli([*args, "--dask-address", dask_cluster["address"]], env, tmp_path / "rerun.log")
    assert code == 0, output
    assert transcribe_requests(whisper_service_url) - before == len(ids) - len(have)  # reused every intermediate
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # and did not rewrite them
    final, errors = read_results(results)
    assert errors == []
    assert_good_lines(final, ids)


# --- (d) a Dask worker killed during tokenisation ---


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dask_worker_killed_during_tokenisation(dask_cluster, whisper_service_url, tmp_path, monkeypatch):
    from distributed import Client

    monkeypatch.setenv("AUDIO_PIPELINE_TOKENIZER_OPTIONS", json.dumps({"delay_s": 3}))
    results = tmp_path / "results"
    killed: list[int] = []

    def in_tokeniser() -> bool:
        """Run on each worker (pickled by value): is a thread inside the simulated tokeniser now?"""
        import sys

        for frame in sys._current_frames().values():
            while frame is not None:
                if frame.f_code.co_filename.endswith("simulated.py") and "tokenisers" in frame.f_code.co_filename:
                    return True
                frame = frame.f_back
        return False

    def kill_a_tokenising_worker() -> None:
        with Client(dask_cluster["address"], timeout=60) as client:
            def busy() -> str | None:
                return next((w for w, yes in client.run(in_tokeniser).items() if yes), None)

            worker = wait_until(busy, 240, "a worker inside the tokeniser", 0.2)
            pid = client.run(os.getpid, workers=[worker])[worker]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_a_tokenising_worker, daemon=True)
    killer.start()
    summary = parallel_transcribe_tokenise(
        audio_root=str(DEMO_AUDIO), results_root=str(results), service_url=whisper_service_url,
        tokenizer="simulated", batch_size=4, dask_address=dask_cluster["address"],
    )
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    assert not alive(killed[0])
    assert summary.failed == 0, summary.errors
    lines, errors = read_results(results)
    assert errors == []
    ids = sorted(REFERENCES)
    assert_good_lines(lines, ids)
    simulated = get_tokeniser("simulated", device="cpu", workload_size=0)
    for i in ids:
        want = simulated.tokenise([decode_audio((DEMO_AUDIO / i).read_bytes(), 16_000)])[0]
        assert lines[i]["token_array"] == want, i
    with Client(dask_cluster["address"], timeout=60) as client:  # the nanny restarted it
        client.wait_for_workers(2, timeout=120)


# --- (e) two runs on the same roots at the same time ---


def test_two_concurrent_runs_on_the_same_roots(whisper_service_url, prefect_api_url, dask_cluster, tmp_path):
    audio, results = tmp_path / "audio", tmp_path / "results"
    ids = copy_demo(audio, ("p225", "p226"))
    env = cli_env(prefect_api_url)
    # Two flow processes, their tasks interleaved on the shared workers, racing on one results root.
    args = ["run", str(audio), "--results", str(results), "--service-url", whisper_service_url,
            "--batch-size", "2", "--dask-address", dask_cluster["address"]]
    procs = [start_cli(args, env, tmp_path / f"run-{i}.log") for i in range(2)]
    try:
        codes = [p.wait(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    logs = [(tmp_path / f"run-{i}.log").read_text(errors="replace") for i in range(2)]
    assert codes == [0, 0], logs
    lines, errors = read_results(results)  # every JSONL parses, sorted, each id exactly once
    assert errors == []
    assert_good_lines(lines, ids)
    for folder in ("p225", "p226"):
        records = [json.loads(x) for x in (results / f"{folder}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in records] == [i for i in ids if i.startswith(folder + "/")]
    assert not [p for p in results.rglob("*.part")]


def test_simulated_tokens_reference_is_deterministic():
    """Guards test (d): its expected tokens come from a fresh simulated tokeniser in this process."""
    clip = decode_audio((DEMO_AUDIO / sorted(REFERENCES)[0]).read_bytes(), 16_000)
    a = get_tokeniser("simulated", device="cpu", workload_size=0).tokenise([clip])[0]
    b = get_tokeniser("simulated", device="cpu", delay_s=0.01).tokenise([np.array(clip)])[0]
    assert a == b and len(a) > 0

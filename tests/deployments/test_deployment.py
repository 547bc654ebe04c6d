"""prefect.yaml, a process worker, `prefect deployment run`, the event trigger and the watcher.

Everything is real: one `prefect server start` per module (its own PREFECT_HOME), the Prefect
CLI as a user types it, a `prefect worker start` subprocess, `audio-pipeline watch` and the
Whisper service. A triggered run first waits the trigger's `schedule_after` (30 s in
prefect.yaml, 10 s here), then the flow takes ~20-40 s on a loaded 2-core machine, so the slow
tests share one corpus and run in file order: watcher alone, deploy, a manual run, runs started
by new files, and last a SIGKILLed run (its automation must not outlive it: it would crash the
other runs, which send heartbeats only every 180 s).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import yaml

from deployments.watcher import EVENT_NAME, watch
from flows.demo import free_port
from tests import waiting
from tests.conftest import DEMO_AUDIO
from tests.metrics import transcribe_requests

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENT = "parallel-transcribe-tokenise/parallel-transcribe-tokenise"
POOL = "audio-pipeline"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CLIPS = sorted(DEMO_AUDIO.rglob("*.flac"))


# The server is polled once a second unless a caller says otherwise.
wait_until = functools.partial(waiting.wait_until, every=1.0)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ minus PREFECT_* (other test modules point those at their harness), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def spawn(args: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `args` with stdout and stderr going to `log`."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(a) for a in args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    log: Path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(**{"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url, **extra})

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`prefect ARGS` from the repository root, as a user types it; must succeed."""
        done = subprocess.run(
            [str(BIN / "prefect"), *args], cwd=REPO, env=self.env(PREFECT_CLI_PROMPT="false"),
            capture_output=True, text=True, timeout=timeout,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def request(self, method: str, path: str, body: object = None) -> object:
        response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else None

    def runs(self, deployment_id: str) -> list[dict]:
        body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200}
        return self.request("POST", "/flow_runs/filter", body)

    def file_events(self, root: Path) -> tuple[int, list[dict]]:
        """How many `audio.file.created` events of files under `root` the server has stored, and the first 50."""
        body = {"filter": {"event": {"name": [EVENT_NAME]}, "resource": {"id_prefix": [f"audio.file.{root}/"]}}, "limit": 50}
        page = self.request("POST", "/events/filter", body)
        return page["total"], page["events"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, log=home / "server.log")
    # PREFECT_API_URL also tells the UI which API to call (it would say port 4200 otherwise).
    proc = spawn([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 server.env(), home, server.log)

    def healthy() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{tail(server.log)}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{server.api_url}/health", timeout=3).status_code == 200
        return False

    try:
        # Migrations on a fresh database take a minute and more on a busy 2-core machine.
        wait_until(healthy, 300, "the Prefect server's /api/health", explain=lambda: tail(server.log))
        yield server
    finally:
        stop(proc)


class TcpForwarder:
    """Listens on 127.0.0.1:`port` and forwards to 127.0.0.1:`target` while the block runs."""

    def __init__(self, port: int, target: int) -> None:
        self.port, self.target = port, target
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> TcpForwarder:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def watcher_process(root: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`audio-pipeline watch ROOT`, yielded once it is watching; Ctrl-C (SIGINT) at the end."""
    proc = spawn([BIN / "audio-pipeline", "watch", root, "--stable-seconds", "1"], env, REPO, log)
    try:
        wait_until(lambda: proc.poll() is not None or "watching" in log.read_text(), 120,
                   "the watcher to start", every=0.5, explain=lambda: tail(log))
        assert proc.poll() is None, tail(log)
        yield proc
    finally:
        code = stop(proc, signal.SIGINT)
    assert code == 0, f"the watcher did not stop cleanly on Ctrl-C:\n{tail(log)}"


def copy_clips(folder: Path, names: Sequence[str], start: int = 0) -> list[Path]:
    """Demo clips copied under new names (shutil.copy: written in place, not renamed in)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        shutil.copy(CLIPS[(start + i) % len(CLIPS)], folder / name)
        paths.append(folder / name)
    return paths


def silent_flac(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(16_000 * seconds), np.float32), 16_000, format="FLAC")
    return buffer.getvalue()


SILENT_FLAC = silent_flac()


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


# -- the watcher alone --------------------------------------------------------------------------


class RecordingSink:
    """Stands in for the Prefect API: keeps what the watcher sends, with the time it arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, object]] = []

    def send(self, events) -> None:
        self.received.extend((time.monotonic(), e) for e in events)

    def ids(self, folder: str = "") -> list[str]:
        return [e.payload["id"] for _, e in self.received if e.payload["id"].startswith(folder)]


@contextlib.contextmanager
def watcher_thread(root: Path, sink: RecordingSink, stable_seconds: float) -> Iterator[None]:
    stop_event = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            watch(root, stable_seconds=stable_seconds, stop_event=stop_event, sink=sink)
        except BaseException as e:  # shown in the test's failure message
            crashed.append(e)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Files written before the OS watch exists are never reported: write probe files until one is.
    probes = iter(range(1000))

    def probe_reported() -> bool:
        if any(i.startswith("probe/") for i in sink.ids()):
            return True
        copy_clips(root / "probe", [f"probe{next(probes)}.flac"])
        return False

    wait_until(probe_reported, 60, "the watcher to report a probe file", every=2, explain=lambda: repr(crashed))
    try:
        yield
    finally:
        stop_event.set()
        thread.join(timeout=20)
    assert not thread.is_alive(), "the watcher did not stop on its stop event"
    assert not crashed


def test_watcher_reports_complete_audio_files_only(tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    sink = RecordingSink()
    clip = CLIPS[0].read_bytes()
    with watcher_thread(root, sink, stable_seconds=1.0):
        folder = root / "p300"
        folder.mkdir()
        (folder / "notes.txt").write_text("not audio")
        (folder / ".hidden.flac").write_bytes(clip)
        (folder / "upload.flac.part").write_bytes(clip)
        (folder / "gone.flac").write_bytes(clip)
        (folder / "gone.flac").unlink()  # deleted before it was complete
        step = len(clip) // 6 + 1
        with (folder / "slow.flac").open("wb") as f:  # written over ~2 s, never still for 1 s
            for start in range(0, len(clip), step):
                if start:
                    time.sleep(0.4)
                f.write(clip[start : start + step])
                f.flush()
            last_write = time.monotonic()
        (folder / "upload.flac.part").rename(folder / "upload.flac")  # a finished download
        wait_until(lambda: len(sink.ids("p300/")) >= 2, 30, "events for slow.flac and upload.flac")
        time.sleep(2)  # anything else would have arrived by now
    assert sorted(sink.ids("p300/")) == ["p300/slow.flac", "p300/upload.flac"]
    arrived = {e.payload["id"]: (t, e) for t, e in sink.received}
    t_slow, slow = arrived["p300/slow.flac"]
    assert t_slow >= last_write + 0.9, "reported before its size had been stable for 1 s"
    assert slow.event == "audio.file.created"
    assert slow.resource.id == f"audio.file.{root.resolve()}/p300/slow.flac"
    assert slow.resource["audio.root"] == str(root.resolve())
    assert slow.payload == {"audio_root": str(root.resolve()), "folder": "p300", "id": "p300/slow.flac", "size": len(clip)}


def test_watch_command_refuses_to_start_without_an_api(tmp_path):
    done = subprocess.run(
        [str(BIN / "audio-pipeline"), "watch", str(tmp_path)], env=clean_env(PREFECT_HOME=str(tmp_path / "home")),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stderr


@pytest.mark.slow
def test_watcher_keeps_events_while_the_api_is_down(prefect_server, tmp_path):
    """The API is a forwarder that is not listening yet: files arrive, then the API comes back."""
    root = tmp_path / "audio"
    root.mkdir()
    log = tmp_path / "watch.log"
    proxy_port = free_port()
    server_port = int(prefect_server.api_url.split(":")[-1].split("/")[0])
    env = prefect_server.env(PREFECT_API_URL=f"http://127.0.0.1:{proxy_port}/api")
    with watcher_process(root, env, log) as proc:
        copy_clips(root / "p230", ["p230_001_mic2.flac", "p230_002_mic2.flac"])
        wait_until(lambda: "Prefect API unreachable" in log.read_text(), 60, "the watcher to notice the outage",
                   explain=lambda: tail(log))
        time.sleep(4)  # down a few seconds more; the watcher keeps retrying
        assert proc.poll() is None, tail(log)
        assert prefect_server.file_events(root.resolve()) == (0, [])
        with TcpForwarder(proxy_port, server_port):
            _, events = wait_until(lambda: (stored := prefect_server.file_events(root.resolve()))[0] == 2 and stored,
                                   90, "both events to reach the server", every=2, explain=lambda: tail(log))
            assert "Prefect API back" in log.read_text()
    assert sorted(e["payload"]["id"] for e in events) == ["p230/p230_001_mic2.flac", "p230/p230_002_mic2.flac"]


# -- deployment, worker, runs ---------------------------------------------------------------------


@dataclass
class Deployed:
    id: str
    raw: dict
    results: Path
    automations: list[dict]  # as `prefect deploy` created them from prefect.yaml


@pytest.fixture(scope="module")
def deployed(prefect_server, whisper_service_url, tmp_path_factory) -> Iterator[Deployed]:
    """The work pool, `prefect deploy --all` from prefect.yaml, and a process worker."""
    prefect_server.cli("work-pool", "create", POOL, "--type", "process")
    prefect_server.cli("--no-prompt", "deploy", "--all")
    raw = prefect_server.request("GET", f"/deployments/name/{DEPLOYMENT}")
    results = tmp_path_factory.mktemp("deployed") / "results"
    # Triggered runs get audio_root from the event and the rest from the deployment's defaults:
    # point those at this session's service and a temporary results root.
    parameters = {**raw["parameters"], "results_root": str(results), "service_url": whisper_service_url}
    prefect_server.request("PATCH", f"/deployments/{raw['id']}", {"parameters": parameters})
    log = prefect_server.home / "worker.log"
    # Started outside the repository: the deployment's pull step must find the code.
    worker = spawn([BIN / "prefect", "worker", "start", "--pool", POOL],
                   prefect_server.env(PREFECT_WORKER_QUERY_SECONDS="2"), prefect_server.home, log)
    try:
        wait_until(lambda: prefect_server.request("GET", f"/work_pools/{POOL}")["status"] == "READY", 120,
                   "the worker to poll the pool", explain=lambda: tail(log))
        automations = prefect_server.request("POST", "/automations/filter", {})
        yield Deployed(id=raw["id"], raw=raw, results=results, automations=automations)
    finally:
        stop(worker)


@pytest.mark.slow
def test_prefect_yaml_deploys_pool_limit_trigger_and_pull_step(deployed, prefect_server):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    raw = deployed.raw
    assert raw["entrypoint"] == "flows/pipeline.py:parallel_transcribe_tokenise"
    assert raw["work_pool_name"] == POOL
    assert raw["parameters"] == spec["parameters"]
    assert set(raw["parameters"]) == {"audio_root", "results_root", "service_url", "tokenizer", "batch_size"}
    assert raw["global_concurrency_limit"]["limit"] == 1
    assert raw["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert raw["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    automations = deployed.automations
    assert len(automations) == 1
    trigger, action = automations[0]["trigger"], automations[0]["actions"][0]
    assert (trigger["within"], action["schedule_after"]) == (spec["triggers"][0]["within"], spec["triggers"][0]["schedule_after"])
    assert trigger["expect"] == [EVENT_NAME] and trigger["posture"] == "Reactive" and trigger["threshold"] == 1
    assert trigger["for_each"] == ["audio.root"]
    # The debounce is only safe while the run starts after the window that absorbed events.
    assert action["schedule_after"] >= trigger["within"] > 0
    assert action["deployment_id"] == deployed.id
    assert action["parameters"] == {"audio_root": "{{ event.payload.audio_root }}"}


@dataclass
class Corpus:
    audio: Path
    run: dict
    requests: int


@pytest.fixture(scope="module")
def corpus(deployed, prefect_server, whisper_service_url, tmp_path_factory) -> Corpus:
    """Two speakers of the demo corpus (4 files), processed by `prefect deployment run`."""
    audio = tmp_path_factory.mktemp("corpus") / "audio"
    for folder in ("p225", "p226"):
        for clip in sorted((DEMO_AUDIO / folder).glob("*.flac"))[:2]:
            (audio / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, audio / folder / clip.name)
    before = transcribe_requests(whisper_service_url)
    done = prefect_server.cli(
        "deployment", "run", DEPLOYMENT, "--param", f"audio_root={audio}",
        "--param", f"results_root={deployed.results}", "--param", f"service_url={whisper_service_url}",
        "--watch", "--watch-timeout", "540", timeout=600,
    )
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1)
    run = prefect_server.request("GET", f"/flow_runs/{run_id}")
    return Corpus(audio=audio, run=run, requests=transcribe_requests(whisper_service_url) - before)


@pytest.mark.slow
def test_deployment_run_by_hand(corpus, deployed, prefect_server):
    assert corpus.run["state_type"] == "COMPLETED", corpus.run["state"]
    assert corpus.run["parameters"]["audio_root"] == str(corpus.audio)
    assert corpus.requests == 4
    for folder in ("p225", "p226"):
        expected = [f"{folder}/{p.name}" for p in sorted((corpus.audio / folder).glob("*.flac"))]
        assert jsonl_ids(deployed.results / f"{folder}.jsonl") == expected
    artifacts = prefect_server.request("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [corpus.run["id"]]}}})
    # Everything the UI shows for the run hangs off the deployment's run, not a subflow.
    assert {"run-summary", "progress", "folder-p225", "folder-p226"} <= {a["key"] for a in artifacts}


TEST_WINDOW_S = 10  # prefect.yaml's 30 s debounce, shortened: the event tests wait it out twice


@pytest.fixture(scope="module")
def watched(corpus, deployed, prefect_server) -> Iterator[Path]:
    """`audio-pipeline watch` on the processed corpus, sending to the deployment's server.

    The trigger keeps its shape (checked above against prefect.yaml) with a shorter window, so
    each event test waits 10 s instead of 30 s twice; the burst still lands inside one window.
    """
    automation = deployed.automations[0]
    update = {k: automation[k] for k in ("name", "description", "enabled", "tags", "trigger", "actions",
                                         "actions_on_trigger", "actions_on_resolve")}
    update["trigger"] = {**automation["trigger"], "within": TEST_WINDOW_S}
    update["actions"] = [{**automation["actions"][0], "schedule_after": TEST_WINDOW_S}]
    prefect_server.request("PUT", f"/automations/{automation['id']}", update)
    with watcher_process(corpus.audio, prefect_server.env(), prefect_server.home / "watch.log"):
        yield corpus.audio


def new_runs(prefect_server: PrefectServer, deployment_id: str, before: set[str], timeout: float = 480) -> list[dict]:
    """The deployment's runs not in `before`, once there is one and all of them have finished."""

    def finished() -> list[dict] | None:
        runs = [r for r in prefect_server.runs(deployment_id) if r["id"] not in before]
        return runs if runs and all(r["state_type"] in TERMINAL for r in runs) else None

    log = prefect_server.home / "worker.log"
    return wait_until(finished, timeout, "triggered runs to finish", every=2, explain=lambda: tail(log))


@pytest.mark.slow
def test_two_new_files_start_one_run_that_transcribes_only_them(watched, deployed, prefect_server, whisper_service_url):
    p225 = deployed.results / "p225.jsonl"
    old_ids = jsonl_ids(p225)
    before_runs = {r["id"] for r in prefect_server.runs(deployed.id)}
    before = transcribe_requests(whisper_service_url)
    copy_clips(watched / "p225", ["p225_101_mic2.flac", "p225_102_mic2.flac"], start=10)
    runs = new_runs(prefect_server, deployed.id, before_runs)
    assert len(runs) == 1
    assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
    assert runs[0]["created_by"]["type"] == "AUTOMATION"
    assert runs[0]["parameters"]["audio_root"] == str(watched.resolve())
    assert transcribe_requests(whisper_service_url) - before == 2
    assert jsonl_ids(p225) == sorted(old_ids + ["p225/p225_101_mic2.flac", "p225/p225_102_mic2.flac"])


@pytest.mark.slow
def test_a_burst_of_50_files_starts_one_run(watched, deployed, prefect_server, whisper_service_url):
    untouched = deployed.results / "p226.jsonl"
    mtime = untouched.stat().st_mtime_ns
    before_runs = {r["id"] for r in prefect_server.runs(deployed.id)}
    before = transcribe_requests(whisper_service_url)
    names = [f"p299_{i:03d}_mic2.flac" for i in range(50)]
    # Silent clips: this test is about events and runs, and silence never reaches the model
    # (an empty transcription, still one request each), so 50 files cost seconds, not a minute.
    (watched / "p299").mkdir()
    for name in names:
        (watched / "p299" / name).write_bytes(SILENT_FLAC)
    runs = new_runs(prefect_server, deployed.id, before_runs)
    # All 50 events fall inside one trigger window: one run, which finds all 50 files.
    assert len(runs) == 1, [(r["name"], r["state_type"], r["created"]) for r in runs]
    assert runs[0]["state_type"] == "COMPLETED", runs[0]["state"]
    assert prefect_server.file_events(watched.resolve())[0] == 2 + 50  # this test's and the one before's
    assert transcribe_requests(whisper_service_url) - before == 50
    assert jsonl_ids(deployed.results / "p299.jsonl") == [f"p299/{n}" for n in names]
    assert untouched.stat().st_mtime_ns == mtime  # folders without new files are not rewritten


# -- runs whose process died ------------------------------------------------------------------

SLEEPER = """
import sys, time
from prefect import flow

@flow(name=sys.argv[1])
def sleeper(seconds: float) -> None:
    time.sleep(seconds)

sleeper(float(sys.argv[2]))
"""


def flow_run_of(prefect_server: PrefectServer, flow_name: str) -> dict | None:
    runs = prefect_server.request("POST", "/flow_runs/filter", {"flows": {"name": {"any_": [flow_name]}}})
    return runs[0] if runs else None


def heartbeats_of(prefect_server: PrefectServer, run_id: str) -> int:
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 1}
    return prefect_server.request("POST", "/events/filter", body)["total"]


@pytest.mark.slow
def test_a_sigkilled_run_is_crashed_not_left_running(prefect_server, tmp_path):
    """Regression: a SIGKILLed flow process left its run Running for ever, holding the
    deployment's only concurrency slot. `audio-pipeline crash-unresponsive-runs` installs the
    automation that crashes it once its heartbeats stop; a run that ends normally is untouched.
    (Heartbeats every 30 s and one missed: a short test. The default is 180 s and three.)"""
    env = prefect_server.env(PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")
    install = [str(BIN / "audio-pipeline"), "crash-unresponsive-runs", "--heartbeat-seconds", "30", "--missed", "1"]
    for _ in range(2):  # idempotent: a second install updates the first
        done = subprocess.run(install, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and "is in place" in done.stdout, done.stdout + done.stderr
    automations = [a for a in prefect_server.request("POST", "/automations/filter", {})
                   if a["name"].startswith("audio-pipeline: crash")]
    assert len(automations) == 1 and automations[0]["trigger"]["within"] == 30
    killed_name, quick_name = f"sleeper-{uuid.uuid4().hex[:8]}", f"quick-{uuid.uuid4().hex[:8]}"
    killed = spawn([sys.executable, "-c", SLEEPER, killed_name, "600"], env, tmp_path, tmp_path / "killed.log")
    quick = spawn([sys.executable, "-c", SLEEPER, quick_name, "1"], env, tmp_path, tmp_path / "quick.log")
    try:
        run = wait_until(lambda: (r := flow_run_of(prefect_server, killed_name)) and r["state_type"] == "RUNNING"
                         and heartbeats_of(prefect_server, r["id"]) and r, 180, "the sleeper's first heartbeat",
                         explain=lambda: tail(tmp_path / "killed.log"))
        stop(killed, signal.SIGKILL)
        assert quick.wait(timeout=180) == 0, tail(tmp_path / "quick.log")
        crashed = wait_until(lambda: (r := flow_run_of(prefect_server, killed_name))["state_type"] != "RUNNING"
                             and r, 150, "the killed run to leave Running")
        assert crashed["id"] == run["id"] and crashed["state_type"] == "CRASHED", crashed["state"]
        assert "heartbeat" in crashed["state"]["message"], crashed["state"]
        assert flow_run_of(prefect_server, quick_name)["state_type"] == "COMPLETED"  # ended runs are left alone
    finally:
        stop(killed, signal.SIGKILL)
        stop(quick)
        for automation in automations:  # the other tests' runs send heartbeats only every 180 s
            prefect_server.request("DELETE", f"/automations/{automation['id']}")

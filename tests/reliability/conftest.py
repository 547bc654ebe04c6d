"""Fixtures for the reliability tests: processes we start, kill and restart ourselves.

Everything binds 127.0.0.1, is bounded in count and time, and is stopped at teardown:
- `ServiceProcess`: `audio-pipeline serve` as a subprocess whose pid we hold (SIGKILL, restart
  on the same port), with its log in a file.
- `dask_cluster`: a real `dask scheduler` + two `dask worker` processes (nanny-managed), shared by
  the session so worker start-up (torch, Prefect imports) is paid once.
- `cli_env` / `start_cli`: `audio-pipeline run ...` as a subprocess against the session's Prefect
  harness (no ephemeral server per run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flows.demo import free_port
from flows.runner import WORKER_PRELOAD
from tests.waiting import wait_until  # noqa: F401  (re-exported: the reliability tests import it from here)

REPO = Path(__file__).parents[2]
PYTHON = sys.executable
BIN = Path(sys.executable).parent


@dataclass
class ServiceProcess:
    """The real Whisper service in a subprocess we control (kill -9, restart on the same port)."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        """Spawn without waiting (call `wait_ready`), so several processes can start at once."""
        self.starts += 1
        log = open(self.log_dir / f"service-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "flows.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def wait_ready(self, timeout_s: float = 240) -> str:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; see {self.log_dir}")
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            return False

        wait_until(healthy, timeout_s, f"the service at {self.url}", 0.25)
        return self.url

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, in-flight requests see their connection drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The session harness's API URL, for subprocesses and Dask workers (they inherit env only)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect test harness did not set PREFECT_API_URL"
    return url


def cli_env(prefect_api_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.update(extra)
    return env


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`audio-pipeline run ...` in its own process group, output to `log`."""
    out = open(log, "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [PYTHON, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        out.close()


def run_cli(args: list[str], env: dict[str, str], log: Path, timeout_s: float = 300) -> tuple[int, str]:
    """Run the CLI to completion; (exit code, combined output). Kills its process group on timeout."""
    proc = start_cli(args, env, log)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise
    return code, log.read_text(errors="replace")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the CLI's process group (it and the Dask workers it spawned), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def read_results(results: Path) -> tuple[dict[str, dict], list[dict]]:
    """Every result line under `results` (lines by id, error records, the refused files' included);
    each must parse, ids once. What is a result is the product's one rule (`output_of`)."""
    from tasks.storage import REFUSED_ERRORS, output_of

    lines: dict[str, dict] = {}
    errors: list[dict] = []
    for path in sorted(results.rglob("*.jsonl")):
        relative = str(path.relative_to(results))
        if output_of(relative) is None and relative != REFUSED_ERRORS:
            continue
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if path.name.endswith(".errors.jsonl"):
            assert all(set(r) == {"id", "stage", "error"} for r in records), path
            errors += records
            continue
        assert [r["id"] for r in records] == sorted(r["id"] for r in records), f"{path} is not sorted by id"
        for r in records:
            assert set(r) == {"id", "transcription", "token_array"}, path
            assert r["id"] not in lines, f"{r['id']} appears twice"
            lines[r["id"]] = r
    return lines, errors


def transcription_ids(results: Path) -> set[str]:
    """Ids with a successful transcription intermediate (what a rerun reuses)."""
    ids = set()
    for path in (results / "transcriptions").rglob("*.json"):
        with contextlib.suppress(ValueError):
            record = json.loads(path.read_text())
            if not record.get("failed"):
                ids.add(record["id"])
    return ids


class DaskProcesses:
    """`dask scheduler` + two nanny-managed `dask worker` processes on loopback."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, args: list, name: str, cwd: Path) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> DaskProcesses:
        self._spawn([BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                     "--dashboard-address", ":0", "--no-show"], "scheduler", self.log_dir)
        for i in range(2):
            self._spawn([BIN / "dask", "worker", self.address, "--nthreads", "2", "--no-dashboard",
                         "--host", "127.0.0.1", *(a for m in WORKER_PRELOAD for a in ("--preload", m))],
                        f"worker-{i}", REPO)
        return self

    def wait_ready(self) -> str:
        from distributed import Client

        with Client(self.address, timeout=120) as client:
            client.wait_for_workers(2, timeout=240)
        return self.address

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


TOKEN = "reliability-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPLOAD_LIMIT = 1024 * 1024


@dataclass
class Warm:
    dask: DaskProcesses
    token_service: ServiceProcess


@pytest.fixture(scope="session")
def warm(request, tmp_path_factory) -> Iterator[Warm]:
    """Start the session's processes side by side: start-up is mostly imports (torch, Prefect),
    so overlapping them roughly halves the wait on 2 cores.

    Order: the token-protected service starts first (it needs nothing), then the Prefect harness
    (blocking), then the Dask processes (they need the harness's API URL), then the shared plain
    service (blocking); everyone is waited for only by the fixture that hands it out.
    """
    logs = tmp_path_factory.mktemp("warm-logs")
    service = ServiceProcess(log_dir=logs, env={"WHISPER_API_TOKEN": TOKEN,
                                                "WHISPER_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}).start()
    dask = None
    try:
        api_url = request.getfixturevalue("prefect_api_url")
        dask = DaskProcesses(logs, cli_env(api_url)).start()
        request.getfixturevalue("whisper_service_url")
        yield Warm(dask=dask, token_service=service)
    finally:
        if dask is not None:
            dask.stop()
        service.stop()


@pytest.fixture(scope="session")
def dask_cluster(warm) -> dict:
    """The shared external Dask cluster: {"address", "logs"}; workers preload the task modules
    (as `flows.runner` documents for existing clusters) and know the harness's PREFECT_API_URL."""
    return {"address": warm.dask.wait_ready(), "logs": warm.dask.log_dir}


@pytest.fixture
def token_service(warm) -> ServiceProcess:
    """The service with WHISPER_API_TOKEN and a 1 MiB upload limit; restarted if a test killed it."""
    service = warm.token_service
    if service.proc is None or service.proc.poll() is not None:
        service.start()
    service.wait_ready()
    return service


def answered(url: str, headers: dict[str, str] | None = None) -> int:
    """Transcription requests the service has answered (tests.metrics, with optional auth)."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.metrics import TRANSCRIBE_ROUTES

    text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).raise_for_status().text
    return int(sum(
        sample.value
        for family in text_string_to_metric_families(text) if family.name == "whisper_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels.get("route") in TRANSCRIBE_ROUTES
    ))

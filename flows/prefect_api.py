"""A Prefect API for CLI runs when none is configured: started at the run's first line, and kept.

With no PREFECT_API_URL, Prefect starts a temporary server the first time a flow needs the API
and waits for it: ~12 s of CPU (imports, database checks, services) on the path of every run,
after the CLI has already spent its own seconds checking the run and importing the flow. So:

- The CLI starts that server at its first line, as a subprocess on the other core, and does its
  own checks and imports meanwhile; the flow then finds PREFECT_API_URL set.
- `keep` (the default, `AUDIO_PIPELINE_PREFECT_SERVER`): the server outlives the run
  (`flows.local_server`) and the next run reuses it: a rerun pays no server start. It stops
  itself after `prefect_server_idle_s` (600 s) without a request; a run holding it touches it
  every minute, so it never stops under a long run. One per Prefect home, found
  through `{PREFECT_HOME}/audio-pipeline-server.json`, started under a file lock.
- `temporary`: started for this run and stopped when it ends, as Prefect does.

Both are Prefect's own temporary server: the same app, settings and database (PREFECT_HOME) as
`SubprocessASGIServer` in `prefect.server.api.server` (Prefect 3.9), on 127.0.0.1. A configured
API (environment, profile or prefect.toml) is used as it is: nothing starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import httpx

ServerMode = Literal["keep", "temporary"]
# What Prefect's SubprocessASGIServer sets for its temporary server: no UI, the services of an
# ephemeral server, and "final" (no second app in that process).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
RECORD = "audio-pipeline-server.json"  # in PREFECT_HOME: the kept server's pid, port, version and command


def configured_api_url() -> str | None:
    """The API URL Prefect would use (environment, active profile, prefect.toml), or None.

    With ephemeral mode disabled there is nothing of ours to start: Prefect reports it.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return settings.api.url or "(ephemeral mode disabled)"
    return None


def uvicorn_command(port: int) -> list[str]:
    """The command Prefect 3.9 runs for its temporary server (pinned by tests/flows/test_prefect_api.py)."""
    import prefect

    return [
        sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]


def kept_command(port: int, idle_s: float, home: Path) -> list[str]:
    """The kept server's command line: the record keeps it, and `is_kept_server` matches it whole."""
    return [sys.executable, "-m", "flows.local_server", "--port", str(port), "--idle-s", str(idle_s),
            "--home", str(home)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout_s: float = 2.0) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{api_url}/health", timeout=timeout_s).status_code == 200
    return False


@dataclass
class LocalServer:
    """A Prefect server subprocess on a loopback port; `wait_ready` blocks until /health answers."""

    port: int
    process: subprocess.Popen | None  # None: a kept server an earlier run started
    log: IO[bytes] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls, command: list[str], port: int, log: IO[bytes], detach: bool = False) -> LocalServer:
        process = subprocess.Popen(
            command, env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=detach,  # a kept server is no child of this run
        )
        return cls(port=port, process=process, log=log)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Raises RuntimeError (with the server's output) if it exits or is not ready in time
        (`timeout_s`, by default Prefect's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
        if timeout_s is None:
            timeout_s = startup_timeout_s()
        deadline = self.started + timeout_s
        while not healthy(self.api_url):
            if self.process is not None and self.process.poll() is not None:
                output = ""
                if self.log is not None:
                    self.log.seek(0)
                    output = self.log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"the local Prefect server exited with code {self.process.returncode}: {output}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Prefect server at {self.api_url} was not ready after {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def server_version() -> str:
    """What a kept server must match to be reused: this Prefect and this Python."""
    import prefect

    return f"prefect {prefect.__version__}; {sys.executable}"


def kept_server(idle_s: float) -> LocalServer:
    """The Prefect home's kept server: the running one if it answers, else a new one (detached)."""
    from filelock import FileLock

    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    record_path = home / RECORD
    with FileLock(str(record_path) + ".lock", timeout=600):  # held for a start (Popen), not a wait
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(record_path.read_text())
            if record["version"] == server_version() and is_kept_server(record, home):
                if healthy(f"http://127.0.0.1:{record['port']}/api"):
                    return LocalServer(port=int(record["port"]), process=None)
                if time.time() - record["started"] < startup_timeout_s():
                    # Still starting (another run started it a moment ago): wait for it, not a second one.
                    return LocalServer(port=int(record["port"]), process=None,
                                       started=time.monotonic() - (time.time() - record["started"]))
            stop_kept_server(record, home)  # another version's, or hung: ours to replace
        port = free_port()
        log = open(home / "audio-pipeline-server.log", "w+b")  # noqa: SIM115 - the server's, kept open by it
        command = kept_command(port, idle_s, home)
        server = LocalServer.start(command, port, log, detach=True)
        wait_exec(server.process, command)  # before the record: the next run must know it for ours
        temp = record_path.with_suffix(".tmp")
        temp.write_text(json.dumps({"pid": server.process.pid, "port": port, "version": server_version(),
                                    "idle_s": idle_s, "started": time.time(), "command": command}))
        temp.replace(record_path)
        return server


def keep_alive(api_url: str, every_s: float, done: threading.Event) -> threading.Thread:
    """Touch the kept server every `every_s` until `done`: its idle clock counts requests, and a
    run whose tasks report nothing for `idle_s` (a big shard on a slow CPU) lost its API mid-run
    (a 2,000-clip run, 20 minutes: `Connection refused` when the flow reported its end)."""

    def beat() -> None:
        while not done.wait(every_s):
            healthy(api_url)

    thread = threading.Thread(target=beat, daemon=True, name="prefect-server-keep-alive")
    thread.start()
    return thread


def is_kept_server(record: dict, home: Path) -> bool:
    """The record's pid still runs the command the record started: this home's kept server, not
    a process that inherited the number. Pids wrap (at 32768 here; a test suite spawns that
    many), and a stale record naming only a pid could have another home's new server killed."""
    command = [str(arg) for arg in record["command"]]
    return command[-2:] == ["--home", str(home)] and runs(int(record["pid"]), command)


def runs(pid: int, command: list[str]) -> bool:
    """`/proc/PID/cmdline` is `command`, argument for argument. Without procfs (macOS), only
    that `pid` is alive: the weaker check this module made before."""
    with contextlib.suppress(OSError):
        if not Path("/proc/self/cmdline").exists():
            os.kill(pid, 0)
            return True
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [arg.encode() for arg in command]
    return False


def wait_exec(process: subprocess.Popen, command: list[str], timeout_s: float = 5.0) -> None:
    """Wait until the child shows `command`: Popen can return while the child is still inside
    execve, when its cmdline reads empty (21 of 200 starts on this machine). A second run that
    read the record then took a starting server for a dead one and replaced it (a CI flake)."""
    deadline = time.monotonic() + timeout_s
    while not runs(process.pid, command) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def stop_kept_server(record: dict, home: Path) -> None:
    """SIGTERM the record's server if its pid still runs it."""
    if is_kept_server(record, home):
        with contextlib.suppress(OSError):
            os.kill(int(record["pid"]), signal.SIGTERM)


def startup_timeout_s() -> float:
    from prefect.settings import get_current_settings

    return get_current_settings().server.ephemeral.startup_timeout_seconds


_running: LocalServer | None = None  # the server an enclosing `prefect_api` block of this process set up


@contextlib.contextmanager
def prefect_api(mode: ServerMode = "keep", idle_s: float = 600.0) -> Iterator[LocalServer | None]:
    """Make sure a Prefect API serves this process; yields the local server (None: configured).

    Starts a server now unless an API is configured, and sets PREFECT_API_URL for this process
    and its children (Dask workers inherit it). Call `wait_ready()` before the flow starts. On
    exit the logs and events still queued are sent; a `temporary` server is stopped, a `keep`
    one left for the next run. A block inside another (the demo's, around a run's) yields the
    outer block's server.
    """
    global _running
    if _running is not None:
        yield _running
        return
    if configured_api_url() is not None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    holding = threading.Event()
    if mode == "keep":
        server = kept_server(idle_s)
        keep_alive(server.api_url, max(1.0, min(60.0, idle_s / 4)), holding)
    else:
        server = LocalServer.start(uvicorn_command(port := free_port()), port, tempfile.TemporaryFile())
    _running = server
    os.environ["PREFECT_API_URL"] = server.api_url  # for child processes; Prefect read its env already
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server
            finally:
                drain_prefect_clients()
    finally:
        holding.set()
        _running = None
        os.environ.pop("PREFECT_API_URL", None)
        if mode == "temporary":
            server.stop()
        if server.log is not None:
            server.log.close()


def drain_prefect_clients(timeout_s: float = 30.0) -> None:
    """Send the logs and events still queued while the server is up (as Prefect's test harness
    does before stopping its server); else each queued batch retries a closed port for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(RuntimeError):  # never started in this process
            worker.drain_all(timeout=timeout_s)

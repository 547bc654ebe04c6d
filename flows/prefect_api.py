"""A Prefect API for one CLI run when none is configured, started at the run's first line.

With no PREFECT_API_URL, Prefect starts a temporary server the first time a flow needs the API
and waits for it: ~10 s of CPU importing the server, on the path of every run, after the CLI has
already spent its own seconds checking the roots and the service and importing the flow. The
CLI knows from its first line that it will need a server, so it starts the same one there, as a
subprocess on another core, and does its own checks and imports meanwhile; the flow then finds
PREFECT_API_URL set and uses it like any server. Same command, same database (PREFECT_HOME) and
the same settings as Prefect's own temporary server (`SubprocessASGIServer` in
`prefect.server.api.server`, Prefect 3.9); stopped when the run ends.

A configured API (environment, profile or prefect.toml) is used as it is: nothing starts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

STARTUP_TIMEOUT_S = 120.0  # a loaded 2-core machine has needed > 20 s
# What Prefect's SubprocessASGIServer sets for its temporary server: no UI, services for an
# ephemeral server only, and "final" (no second app in that process).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def configured_api_url() -> str | None:
    """The API URL Prefect would use (environment, active profile, prefect.toml), or None.

    None with ephemeral mode disabled is not ours to override: Prefect then reports it.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TemporaryServer:
    """A Prefect server subprocess on a free loopback port; `wait_ready` blocks until /health answers."""

    port: int
    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls) -> TemporaryServer:
        port = free_port()
        process = subprocess.Popen(
            uvicorn_command(port), env={**os.environ, **SERVER_ENV},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        return cls(port=port, process=process)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Raises RuntimeError (with the server's stderr) if it exits or is not ready in time."""
        deadline = self.started + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace")[-2000:] if self.process.stderr else ""
                    raise RuntimeError(f"the temporary Prefect server exited with code {self.process.returncode}: {err}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the temporary Prefect server at {self.api_url} was not ready after {timeout_s:.0f} s")
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


_running: TemporaryServer | None = None  # the server a `prefect_api` block of this process started


@contextlib.contextmanager
def prefect_api() -> Iterator[TemporaryServer | None]:
    """Start a temporary Prefect server now unless an API is configured; yields it (or None).

    Sets PREFECT_API_URL for this process and its children (Dask workers inherit it) and stops
    the server on exit. Call `wait_ready()` before the flow starts. A block inside another
    (the demo's, around a run's) yields the outer block's server and leaves it running.
    """
    global _running
    if _running is not None:
        yield _running
        return
    if configured_api_url() is not None:
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = _running = TemporaryServer.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # for child processes; Prefect read its env already
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        _running = None
        os.environ.pop("PREFECT_API_URL", None)
        drain_prefect_clients()
        server.stop()


def drain_prefect_clients(timeout_s: float = 30.0) -> None:
    """Send the logs and events still queued to the server while it is up (as Prefect's test
    harness does before stopping its server); else each queued batch retries against a closed
    port at exit, for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(RuntimeError):  # never started in this process
            worker.drain_all(timeout=timeout_s)

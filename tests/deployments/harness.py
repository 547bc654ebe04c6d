"""What the deployment tests share: real Prefect servers, processes, watchers and audio files."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from deployments.outbox import EventSink
from deployments.watcher import EVENT_NAME, watch
from flows.demo import free_port
from tests import waiting
from tests.conftest import DEMO_AUDIO

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
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONFAULTHANDLER="1", **extra)
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(args: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `args` with stdout and stderr going to `log`.

    SIGINT is reset to its default in the child: pytest started in the background by a shell
    without job control (`pytest ... &` in a script, some CI runners) ignores SIGINT, children
    inherit that, and a Python child then never gets KeyboardInterrupt, so Ctrl-C (`stop(proc,
    SIGINT)`) would not stop a watcher (seen as a hang in `watchfiles`).
    """
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(a) for a in args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_default_sigint)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # A hang: SIGABRT first, so a Python child (PYTHONFAULTHANDLER=1, see clean_env) writes
        # every thread's stack to its log, which says where it hung; then kill it.
        proc.send_signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=3)
        proc.kill()
        proc.wait()
        raise


TRANSIENT_STATUSES = frozenset({429, 502, 503})  # what Prefect's client retries by default


@dataclass
class PrefectServer:
    api_url: str
    home: Path
    log: Path
    auth: str | None = None  # the server's PREFECT_SERVER_API_AUTH_STRING, if any

    def env(self, **extra: str) -> dict[str, str]:
        env = {"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url}
        if self.auth is not None:
            env["PREFECT_API_AUTH_STRING"] = self.auth
        return clean_env(**{**env, **extra})

    def headers(self) -> dict[str, str]:
        """What Prefect's own client sends: `Basic base64(auth string)`."""
        if self.auth is None:
            return {}
        return {"Authorization": "Basic " + base64.b64encode(self.auth.encode()).decode()}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`prefect ARGS` from the repository root, as a user types it; must succeed."""
        done = subprocess.run(
            [str(BIN / "prefect"), *args], cwd=REPO, env=self.env(PREFECT_CLI_PROMPT="false"),
            capture_output=True, text=True, timeout=timeout,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done

    def request(self, method: str, path: str, body: object = None) -> object:
        """One API call, retried as Prefect's own client retries it: a busy SQLite server answers
        503 (database locked) now and then under load."""
        for attempt in range(6):
            response = httpx.request(method, f"{self.api_url}{path}", json=body, headers=self.headers(), timeout=30)
            if response.status_code not in TRANSIENT_STATUSES or attempt == 5:
                break
            time.sleep(0.5 * 2**attempt)
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


@contextlib.contextmanager
def prefect_server_running(home: Path, auth: str | None = None, **server_env: str) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite unless
    `server_env` names another database); with `auth`, the API requires that auth string."""
    port = free_port()
    server = PrefectServer(api_url=f"http://127.0.0.1:{port}/api", home=home, log=home / "server.log", auth=auth)
    if auth is not None:
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    # PREFECT_API_URL also tells the UI which API to call (it would say port 4200 otherwise).
    proc = spawn([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 server.env(**server_env), home, server.log)

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
def watcher_process(root: Path, env: dict[str, str], log: Path, state_dir: Path) -> Iterator[subprocess.Popen]:
    """`audio-pipeline watch ROOT` (outbox in `state_dir`), yielded once it is watching; Ctrl-C (SIGINT) at the end."""
    env = {**env, "AUDIO_PIPELINE_WATCH_STATE_DIR": str(state_dir)}
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


class RecordingSink:
    """Stands in for the Prefect API: keeps what the watcher sends, with the time it arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, object]] = []

    def send(self, events) -> None:
        self.received.extend((time.monotonic(), e) for e in events)

    def ids(self, folder: str = "") -> list[str]:
        return [e.payload["id"] for _, e in self.received if e.payload["id"].startswith(folder)]


@contextlib.contextmanager
def watcher_thread(root: Path, sink: EventSink, stable_seconds: float, state_dir: Path,
                   sent: Callable[[], list[str]] | None = None) -> Iterator[None]:
    """`watch()` in a thread until the block ends; `sent()` lists the ids the API has (default: the sink's)."""
    sent = sent or sink.ids
    stop_event = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            watch(root, stable_seconds=stable_seconds, stop_event=stop_event, sink=sink, state_dir=state_dir)
        except BaseException as e:  # shown in the test's failure message
            crashed.append(e)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Files written before the OS watch exists are never reported: write probe files until one is.
    probes = iter(range(1000))

    def probe_reported() -> bool:
        if any(i.startswith("probe/") for i in sent()):
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

"""Start a Whisper service subprocess on a free loopback port for the demo (and tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RunningService:
    url: str
    pid: int


@contextlib.contextmanager
def service_process(
    port: int = 0, env: dict[str, str] | None = None, log: str | os.PathLike | None = None,
    timeout_s: float = 180.0, extra_args: tuple[str, ...] = (),
) -> Iterator[RunningService]:
    """Run `audio-pipeline serve` on 127.0.0.1 until the block exits; yields it once healthy.

    `env` is added to this process's environment (e.g. WHISPER_API_TOKEN). The service's own
    log goes to `log`, or to a temp file (its access log would drown the caller's output) whose
    tail is shown if the service dies before it is ready.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.fspath(log) if log else None
    if log_path is None:
        with tempfile.NamedTemporaryFile(prefix="whisper-service-", suffix=".log", delete=False) as temp:
            log_path = temp.name
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args],
            env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"the Whisper service exited with code {proc.returncode} before it was ready:\n"
                                   f"{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Whisper service at {url} was not ready after {timeout_s:.0f} s")
            time.sleep(0.25)
        yield RunningService(url=url, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is None:
            os.unlink(log_path)


@contextlib.contextmanager
def local_service(port: int = 0, timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """The demo's service: `service_process` with this environment; yields its URL."""
    with service_process(port, timeout_s=timeout_s, extra_args=extra_args) as service:
        yield service.url


DEMO_LONG_ID = "book/demo_long.flac"  # a long recording in the demo, so its output shows segments (issue 22)


def demo_corpus(bundled: Path, target: Path, pauses: tuple[float, float] = (0.4, 1.4)) -> Path:
    """The demo's audio root: the bundled clips (linked, or copied where links fail) plus
    `book/demo_long.flac`, every bundled clip read one after another with pauses (~80 s at 16 kHz:
    over the 30 s threshold, so the demo cuts it into segments). Built once, then reused, so
    the demo's results root keeps one audio root (`_owner.json`)."""
    import numpy as np
    import soundfile as sf

    clips = sorted(bundled.rglob("*.flac"))
    for clip in clips:
        dest = target / clip.relative_to(bundled)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(clip, dest)
            except OSError:
                shutil.copyfile(clip, dest)
    long_path = target / DEMO_LONG_ID
    if not long_path.exists():
        rng = np.random.default_rng(22)
        parts = []
        for clip in clips:
            audio, rate = sf.read(clip, dtype="float32")
            if rate != 16_000 or audio.ndim != 1:
                raise ValueError(f"demo clip {clip} is not 16 kHz mono")
            parts += [audio, np.zeros(int(rng.uniform(*pauses) * rate), np.float32)]
        long_path.parent.mkdir(parents=True, exist_ok=True)
        temp = long_path.with_suffix(".tmp.flac")
        sf.write(temp, np.concatenate(parts), 16_000, format="FLAC", subtype="PCM_16")
        os.replace(temp, long_path)
    return target

"""Start a Whisper service subprocess on a free loopback port for the demo (and tests)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_service(port: int = 0, timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Run `audio-pipeline serve` on 127.0.0.1 until the block exits; yields its URL once healthy.

    The service's own log goes to a temp file (its access log would drown the flow's output);
    its tail is shown if the service dies before it is ready.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="whisper-service-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra_args],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                with open(log.name, errors="replace") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"the Whisper service exited with code {proc.returncode} before it was ready:\n{tail}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Whisper service at {url} was not ready after {timeout_s:.0f} s")
            time.sleep(0.25)
        yield url
    finally:
        log.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(log.name)

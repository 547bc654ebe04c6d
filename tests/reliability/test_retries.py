"""The service client's retry policy against a scripted HTTP server on loopback (no model needed).

Retries with doubling backoff on connection errors and 5xx; a 4xx is the file's fault and is
never sent again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows.demo import free_port
from tasks.settings import PipelineSettings
from tasks.transcribe import ServiceClient, ServiceError, ServiceRejectedError


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs with the next status of `server.script` (the last one repeats)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        server.times.append(time.monotonic())
        status = server.script[min(len(server.times), len(server.script)) - 1]
        body = {"text": "ok", "language": "en", "duration": 1.0, "model": "m"} if status == 200 else {"error": "no"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.times, server.script = [], [200]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client(url: str) -> ServiceClient:
    return ServiceClient(PipelineSettings(audio_root="/a", service_url=url, http_retries=3, http_backoff_s=0.2))


def test_5xx_is_retried_with_doubling_backoff(scripted):
    scripted.script = [503, 500, 200]
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    with client(url) as c:
        assert c.transcribe(b"x", "a.flac")["text"] == "ok"
    gaps = [b - a for a, b in zip(scripted.times, scripted.times[1:], strict=False)]
    assert len(scripted.times) == 3
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # it slept 0.2 s, then 0.4 s (lower bounds only: a busy machine adds)


@pytest.mark.parametrize("status", [400, 401, 413, 422])
def test_4xx_is_never_retried(scripted, status):
    scripted.script = [status]
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    with client(url) as c, pytest.raises(ServiceRejectedError) as raised:
        c.transcribe(b"x", "a.flac")
    assert raised.value.status == status and len(scripted.times) == 1


def test_unreachable_service_gives_up_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with client(url) as c, pytest.raises(ServiceError, match=f"{url}/transcribe failed after 4 attempts: ConnectError"):
        c.transcribe(b"x", "a.flac")
    assert time.monotonic() - started >= 0.2 + 0.4 + 0.8  # it backed off between the 4 attempts

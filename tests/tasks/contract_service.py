"""A loopback HTTP server that speaks the Whisper service's contract (`/healthz`, `/transcribe`).

For the tests that must choose what the service says (its engine and decode fingerprint, a
flagged clip, an older service without quality fields) and count exactly what was sent. The real
service is exercised end to end in `test_stages_real_service.py`. The text it answers is a hash of
the uploaded bytes, so replacing a file's audio changes its transcript.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import soundfile as sf


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        svc = self.server.owner
        body = {"status": "ok", "engine": svc.engine, "model": svc.model, "device": "cpu",
                "weights_sha256": "0" * 64, "decode": {"beam_size": 1}}
        if svc.fingerprint is not None:
            body["fingerprint"] = svc.fingerprint
        self._send(200, body)

    def do_POST(self) -> None:  # noqa: N802
        svc = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
        )
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        filename = fields["file"].get_filename()
        language = fields["language"].get_payload(decode=True).decode() if "language" in fields else None
        with svc.lock:
            svc.requests.append(filename)
        if svc.status != 200:
            self._send(svc.status, {"error": "scripted failure"})
            return
        try:
            info = sf.info(io.BytesIO(data))
        except RuntimeError:
            self._send(400, {"error": "not readable audio"})
            return
        text = f"{svc.engine} heard {hashlib.blake2b(data, digest_size=4).hexdigest()}"
        body = {"text": text, "language": language or "en", "duration": info.duration, "model": svc.model}
        if not svc.legacy:
            flags = svc.flags.get(filename, [])
            body.update({
                "engine": svc.engine, "fingerprint": svc.fingerprint, "language_probability": None,
                "avg_logprob": -1.4 if flags else -0.2, "no_speech_prob": 0.01,
                "compression_ratio": 3.1 if flags else 1.1, "temperature": 0.0, "words_per_second": 2.0,
                "flags": flags,
            })
        self._send(200, body)

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    owner: ContractService


class ContractService:
    """Start with `with ContractService(engine=..., fingerprint=...) as svc:`; `svc.url`, `svc.requests`.

    Args:
        fingerprint: what `/healthz` and each answer name; None: an older service naming none.
        legacy: answer only `text, language, duration, model` (a service from before the quality fields).
        flags: file name -> quality flags its answer carries.
    """

    def __init__(self, engine: str = "openai-whisper", fingerprint: str | None = "fp-openai-1",
                 legacy: bool = False, flags: dict[str, list[str]] | None = None, model: str = "tiny.en") -> None:
        self.engine, self.fingerprint, self.legacy, self.model = engine, fingerprint, legacy, model
        self.flags = flags or {}
        self.status = 200
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ContractService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

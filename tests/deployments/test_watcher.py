"""The watcher alone: which files make events, and the outbox (kept on disk, 4xx parked, bad names skipped).

The Prefect API is stood in for by a real HTTP server on 127.0.0.1 (`EventsApi`) that answers
like `POST /api/events` and can refuse chosen events with 422, which the real server only does
for malformed events; the watcher talks to it through Prefect's own client (`PrefectEventSink`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import prefect
import pytest
from prefect.events import Event
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.outbox import OutboxFile, WatcherConfigError
from deployments.recheck import Confirmations, RunSeen
from deployments.watcher import PrefectEventSink
from flows.demo import free_port
from tests.deployments.harness import (
    BIN,
    CLIPS,
    REPO,
    SILENT_FLAC,
    RecordingSink,
    clean_env,
    copy_clips,
    spawn,
    stop,
    tail,
    wait_until,
    watcher_thread,
)


class EventsApi:
    """`POST /api/events` on 127.0.0.1:`port`: stores the events of a batch, or answers 422 to a
    batch holding an event whose id contains `refuse` (and to `status` when set: every batch)."""

    def __init__(self, port: int | None = None, refuse: str = "refused") -> None:
        self.port = port or free_port()
        self.refuse = refuse
        self.status: int | None = None
        self.accepted: list[dict] = []
        self.batches: list[tuple[int, list[str]]] = []  # (answer, ids) per request
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (Prefect's client asks for the server version first)
                body = json.dumps(prefect.__version__).encode()
                self.send_response(200 if self.path == "/api/admin/version" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = [e["payload"]["id"] for e in body]
                if self.path != "/api/events":
                    code = 404
                elif api.status is not None:
                    code = api.status
                elif any(api.refuse in i for i in ids):
                    code = 422
                else:
                    code = 204
                    api.accepted.extend(body)
                api.batches.append((code, ids))
                detail = b'{"detail": "event payload refused by the test API"}' if code != 204 else b""
                self.send_response(code)
                self.send_header("Content-Length", str(len(detail)))
                self.end_headers()
                self.wfile.write(detail)

            def log_message(self, *args: object) -> None:
                pass

        self._handler = Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def ids(self, folder: str = "") -> list[str]:
        return [e["payload"]["id"] for e in self.accepted if e["payload"]["id"].startswith(folder)]

    @contextlib.contextmanager
    def serving(self) -> Iterator[EventsApi]:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


class ApiSink(PrefectEventSink):
    """The watcher's real sink (Prefect's client), pointed at `url` whichever thread sends."""

    def __init__(self, url: str) -> None:
        self.url, self.timeout_s = url, 5.0

    def send(self, events: Sequence[Event]) -> None:
        with temporary_settings({PREFECT_API_URL: self.url}):
            super().send(events)


def test_watcher_reports_complete_audio_files_only(tmp_path):
    root = tmp_path / "audio"
    root.mkdir()
    sink = RecordingSink()
    clip = CLIPS[0].read_bytes()
    with watcher_thread(root, sink, stable_seconds=1.0, state_dir=tmp_path / "state"):
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


# -- the outbox ---------------------------------------------------------------------------------


def _event(i: int) -> Event:
    return Event(event="audio.file.created", id=uuid.uuid4(), resource={"prefect.resource.id": f"audio.file.x/{i}"},
                 payload={"id": f"p1/{i}.flac"})


def test_the_outbox_file_keeps_what_was_not_delivered(tmp_path):
    store = OutboxFile(tmp_path)
    store.load()
    events = [_event(i) for i in range(5)]
    store.append(events[:3])
    store.append(events[3:])
    store.done(2)  # two delivered, then the process dies (no close)
    with (tmp_path / "outbox.jsonl").open("ab") as f:
        f.write(b'{"event": "audio.file.cre')  # and its last append was torn
    store._lock.close()
    again = OutboxFile(tmp_path)
    assert [e.id for e in again.load()] == [e.id for e in events[2:]]
    again.done(3)  # all delivered: the file starts over, and a restart finds nothing
    again.close()
    assert OutboxFile(tmp_path).load() == []


def test_a_second_watcher_cannot_share_an_outbox(tmp_path):
    first = OutboxFile(tmp_path)
    with pytest.raises(WatcherConfigError, match="another watcher"):
        OutboxFile(tmp_path)
    first.close()
    OutboxFile(tmp_path).close()


def test_events_of_a_killed_watcher_are_sent_by_the_next_one(tmp_path):
    """Regression: the outbox lived in memory, so a watcher that died lost the events it held."""
    root, state, log = tmp_path / "audio", tmp_path / "state", tmp_path / "watch.log"
    root.mkdir()
    api = EventsApi()  # not serving yet: connections are refused
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=api.url,
                    AUDIO_PIPELINE_WATCH_STATE_DIR=str(state))
    args = [BIN / "audio-pipeline", "watch", root, "--stable-seconds", "1"]
    proc = spawn(args, env, REPO, log)
    try:
        wait_until(lambda: proc.poll() is not None or "watching" in log.read_text(), 120, "the watcher to start",
                   every=0.5, explain=lambda: tail(log))
        copy_clips(root / "p1", ["p1_001.flac", "p1_002.flac"])
        wait_until(lambda: log.read_text().count("new audio file p1/") == 2 and "unreachable" in log.read_text(),
                   60, "both files to be queued while the API is down", every=0.5, explain=lambda: tail(log))
    finally:
        stop(proc, signal.SIGKILL)  # no chance to do anything on the way out
    with api.serving():
        proc = spawn(args, env, REPO, tmp_path / "watch2.log")
        try:
            wait_until(lambda: len(api.ids()) >= 2, 120, "the queued events to arrive after the restart",
                       every=0.5, explain=lambda: tail(tmp_path / "watch2.log"))
        finally:
            assert stop(proc, signal.SIGINT) == 0, tail(tmp_path / "watch2.log")
    assert sorted(api.ids()) == ["p1/p1_001.flac", "p1/p1_002.flac"]
    assert "2 event(s) from before the restart" in (tmp_path / "watch2.log").read_text()


def test_a_refused_event_is_parked_and_the_others_go_through(tmp_path, caplog):
    """Regression: a batch answered 422 was retried for ever and blocked every later event."""
    root, state = tmp_path / "audio", tmp_path / "state"
    root.mkdir()
    caplog.set_level(logging.INFO, logger="deployments")
    with EventsApi().serving() as api, watcher_thread(root, ApiSink(api.url), 0.5, state, sent=api.ids):
        folder = root / "p1"
        folder.mkdir()
        names = ["a.flac", "b.flac", "refused.flac", "c.flac", "d.flac"]
        for name in names:  # one burst: one batch, which the API refuses as a whole
            (folder / name).write_bytes(SILENT_FLAC)
        wait_until(lambda: len(api.ids("p1/")) == 4, 30, "the four acceptable events", explain=lambda: caplog.text)
        (folder / "later.flac").write_bytes(SILENT_FLAC)
        wait_until(lambda: "p1/later.flac" in api.ids(), 30, "a later event", explain=lambda: caplog.text)
    assert sorted(api.ids("p1/")) == ["p1/a.flac", "p1/b.flac", "p1/c.flac", "p1/d.flac", "p1/later.flac"]
    assert any(code == 422 and len(ids) == 5 for code, ids in api.batches), api.batches  # it did come as one batch
    parked = [json.loads(line) for line in (state / "parked.jsonl").read_text().splitlines()]
    assert [(p["status"], p["event"]["payload"]["id"]) for p in parked] == [(422, "p1/refused.flac")]
    assert "refused by the test API" in parked[0]["reason"]
    assert "parked in" in caplog.text
    assert OutboxFile(state).load() == []  # nothing left waiting


def test_an_unauthorised_answer_is_retried_not_parked(tmp_path, caplog):
    """401 (a wrong PREFECT_API_AUTH_STRING) would refuse every event: keep them, say why, retry."""
    root, state = tmp_path / "audio", tmp_path / "state"
    root.mkdir()
    caplog.set_level(logging.INFO, logger="deployments")
    with EventsApi().serving() as api, watcher_thread(root, ApiSink(api.url), 0.5, state, sent=api.ids):
        api.status = 401
        (root / "p1").mkdir()
        (root / "p1" / "a.flac").write_bytes(SILENT_FLAC)
        wait_until(lambda: "PREFECT_API_AUTH_STRING" in caplog.text, 30, "the watcher to name the setting")
        time.sleep(1.5)  # a few retries
        assert not (state / "parked.jsonl").exists()
        api.status = None
        wait_until(lambda: "p1/a.flac" in api.ids(), 30, "the event once the API accepts it", explain=lambda: caplog.text)


def test_names_that_cannot_be_ids_are_skipped_not_fatal(tmp_path, caplog):
    """Regression: one non-UTF-8 name (`caf\\xe9.flac` on disk) killed the watcher (UnicodeEncodeError)."""
    root, state = tmp_path / "audio", tmp_path / "state"
    root.mkdir()
    caplog.set_level(logging.INFO, logger="deployments")
    with EventsApi().serving() as api, watcher_thread(root, ApiSink(api.url), 0.5, state, sent=api.ids):
        folder = root / "p1"
        folder.mkdir()
        latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.flac")
        with open(latin1, "wb") as f:
            f.write(SILENT_FLAC)
        (folder / "tab\there.flac").write_bytes(SILENT_FLAC)
        (folder / "good.flac").write_bytes(SILENT_FLAC)
        wait_until(lambda: "p1/good.flac" in api.ids(), 30, "the good file's event", explain=lambda: caplog.text)
        time.sleep(1.5)  # anything else would have arrived by now
        (folder / "after.flac").write_bytes(SILENT_FLAC)  # and the watcher is still alive
        wait_until(lambda: "p1/after.flac" in api.ids(), 30, "a later file's event", explain=lambda: caplog.text)
    assert sorted(api.ids("p1/")) == ["p1/after.flac", "p1/good.flac"]
    assert "not valid UTF-8" in caplog.text and "control characters" in caplog.text


def test_a_non_utf8_name_in_a_watched_folder_does_not_stop_the_watcher(tmp_path, caplog):
    """Regression: in a folder already watched, watchfiles itself raises on a non-UTF-8 name
    ("Unable to decode path") and its generator dies; the watcher restarts it and rescans."""
    root, state = tmp_path / "audio", tmp_path / "state"
    (root / "p1").mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="deployments")
    with EventsApi().serving() as api, watcher_thread(root, ApiSink(api.url), 0.5, state, sent=api.ids):
        with open(os.path.join(os.fsencode(root / "p1"), b"caf\xe9.flac"), "wb") as f:
            f.write(SILENT_FLAC)
        (root / "p1" / "good.flac").write_bytes(SILENT_FLAC)
        wait_until(lambda: "p1/good.flac" in api.ids(), 30, "the good file's event", explain=lambda: caplog.text)
        (root / "p1" / "after.flac").write_bytes(SILENT_FLAC)
        wait_until(lambda: "p1/after.flac" in api.ids(), 30, "a later file's event", explain=lambda: caplog.text)
    assert "not valid UTF-8" in caplog.text


# -- announced again after a failed run -----------------------------------------------------------


def _announce(confirm: Confirmations, at: datetime, *ids: str) -> None:
    confirm.announced(Event(event="audio.file.created", occurred=at, resource={"prefect.resource.id": f"audio.file.x/{i}"},
                            payload={"id": i}) for i in ids)


def _run(name: str, state: str, start: datetime, seconds: float = 10, tags: tuple[str, ...] = (),
         message: str = "") -> RunSeen:
    return RunSeen(id=name, state_type=state, state_name=state.title(), message=message, tags=tags,
                   start_time=start, end_time=start + timedelta(seconds=seconds) if state != "RUNNING" else None)


def test_files_of_a_failed_run_are_announced_again_until_a_run_completes(caplog):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s = timedelta(seconds=1)
    confirm = Confirmations(Path("/data/audio"), retry_s=60, retries=2)
    _announce(confirm, t0, "p1/a.flac", "p1/b.flac")
    assert confirm.update([], t0 + 30 * s) is None  # no run yet: wait
    running = _run("r1", "RUNNING", t0 + 40 * s)
    assert confirm.update([running], t0 + 50 * s) is None
    failed = _run("r1", "FAILED", t0 + 40 * s, message="Whisper service not reachable")
    assert confirm.update([failed], t0 + 60 * s) is None  # 60 s after its end, not sooner
    assert confirm.update([failed], t0 + 110 * s) == "p1/b.flac"  # the newest file: the run lists the root
    assert confirm.update([failed], t0 + 200 * s) is None  # answered once
    assert "announcing its 2 file(s) again (1 of 2)" in caplog.text
    _announce(confirm, t0 + 150 * s, "p2/c.flac")  # a file arriving meanwhile
    crashed = _run("r2", "CRASHED", t0 + 160 * s)
    assert confirm.update([failed, crashed], t0 + 200 * s) is None  # the delay doubles: 120 s
    assert confirm.update([failed, crashed], t0 + 300 * s) == "p2/c.flac"
    # A completed run covers what was announced before it started, and the count starts over.
    _announce(confirm, t0 + 400 * s, "p3/d.flac")
    done = _run("r3", "COMPLETED", t0 + 350 * s)
    assert confirm.update([failed, crashed, done], t0 + 420 * s) is None
    assert [i for _, i in confirm.pending] == ["p3/d.flac"] and confirm.failed_in_a_row == 0


def test_a_refused_run_is_not_retried_and_retries_end(caplog):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s = timedelta(seconds=1)
    confirm = Confirmations(Path("/data/audio"), retry_s=0, retries=1)
    _announce(confirm, t0, "p1/a.flac")
    refused = _run("r1", "FAILED", t0 + 40 * s, tags=("audio-pipeline", "refused"), message="audio root '/data/audio' is outside")
    assert confirm.update([refused], t0 + 100 * s) is None
    assert not confirm.pending and "was refused (audio root '/data/audio' is outside)" in caplog.text
    # Cancelled by a person: left alone. Failing again and again: bounded.
    _announce(confirm, t0 + 200 * s, "p1/b.flac")
    cancelled = _run("r2", "CANCELLED", t0 + 210 * s)
    assert confirm.update([cancelled], t0 + 300 * s) is None and len(confirm) == 1
    first, second = _run("r3", "FAILED", t0 + 310 * s), _run("r4", "FAILED", t0 + 400 * s)
    assert confirm.update([cancelled, first], t0 + 330 * s) == "p1/b.flac"
    assert confirm.update([cancelled, first, second], t0 + 500 * s) is None
    assert not confirm.pending and "1 run(s) in a row over /data/audio failed" in caplog.text

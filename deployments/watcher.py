"""Watch an audio root; emit one Prefect event `audio.file.created` per new, completely written file.

The deployment's trigger (prefect.yaml) turns a burst of these events into a few flow runs of
`parallel-transcribe-tokenise` over the root; each run reuses what is done already.

Why not `prefect.events.emit_event`: it queues the event for a background worker that, when
the API cannot be reached, gives up after a few seconds and drops every queued event with one
log line (measured on Prefect 3.9.1). A file whose event is lost is only picked up by the next
event or a manual run, so the watcher keeps its own outbox and posts it to `POST /api/events`,
which answers once the server has accepted the batch, retrying with backoff while it is down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import httpx
import watchfiles
from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

from tasks.discover import is_candidate
from tasks.records import folder_of
from tasks.settings import DEFAULT_EXTENSIONS

logger = logging.getLogger(__name__)

EVENT_NAME = "audio.file.created"
_EVENT_NAMESPACE = uuid.UUID("6f1d3c2e-7a55-4c1e-9a0b-3e1f2d6c8b10")


class WatcherConfigError(ValueError):
    """The watcher cannot start with this configuration (e.g. no Prefect API to send to)."""


class EventSink(Protocol):
    def send(self, events: Sequence[Event]) -> None:
        """Deliver all `events` or raise `httpx.HTTPError`."""


class PrefectEventSink:
    """Posts events to the configured Prefect server's `POST /api/events`.

    Raises:
        WatcherConfigError: PREFECT_API_URL is not set. Without it Prefect would start a
            private ephemeral server whose automations nobody has deployed.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        if not get_current_settings().api.url:
            raise WatcherConfigError(
                "PREFECT_API_URL is not set: point it at the server the deployment lives on, "
                "e.g. `export PREFECT_API_URL=http://127.0.0.1:4200/api`"
            )
        self.timeout_s = timeout_s

    def send(self, events: Sequence[Event]) -> None:
        # One attempt per call: the outbox owns retries and backoff, so the watch loop keeps
        # noticing files (and a stop request) while the API is down.
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            with get_client(sync_client=True, httpx_settings={"timeout": self.timeout_s}) as client:
                client.request("POST", "/events", json=[e.model_dump(mode="json") for e in events])


class Outbox:
    """Events waiting for delivery, sent in order; failed sends are retried with backoff."""

    def __init__(self, sink: EventSink, first_backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 batch_size: int = 200) -> None:
        self.sink = sink
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self._events: deque[Event] = deque()
        self._next_try = 0.0
        self._backoff = first_backoff_s
        self._failing_since: float | None = None
        self.delivered = 0

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: Event) -> None:
        self._events.append(event)

    def flush(self, now: float, force: bool = False) -> None:
        """Send what is queued unless a retry is not due yet (`force`: try now); never raises on network errors."""
        while self._events and (force or now >= self._next_try):
            batch = [self._events[i] for i in range(min(self.batch_size, len(self._events)))]
            try:
                self.sink.send(batch)
            except httpx.HTTPError as e:
                if self._failing_since is None:
                    self._failing_since = now
                    logger.warning("Prefect API unreachable (%s); %d event(s) queued, retrying", e, len(self))
                else:
                    logger.debug("Prefect API still unreachable (%s); retry in %.1f s", e, self._backoff)
                self._next_try = now + self._backoff
                self._backoff = min(self._backoff * 2, self.max_backoff_s)
                return
            for _ in batch:
                self._events.popleft()
            self.delivered += len(batch)
            if self._failing_since is not None:
                logger.warning("Prefect API back after %.0f s; sent the queued events", now - self._failing_since)
            self._failing_since = None
            self._backoff = self.first_backoff_s
            self._next_try = 0.0


class StabilityTracker:
    """Files seen changing; a file is complete once its size and mtime stay put for `stable_s`.

    Empty files stay pending: a writer may create the file before writing to it.
    """

    def __init__(self, stable_s: float) -> None:
        self.stable_s = stable_s
        self._pending: dict[Path, tuple[tuple[int, int] | None, float]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def touched(self, path: Path, now: float) -> None:
        self._pending[path] = (None, now)

    def removed(self, path: Path) -> None:
        self._pending.pop(path, None)

    def complete(self, now: float) -> list[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of the files that became stable, in path order."""
        done = []
        for path, (seen, since) in sorted(self._pending.items()):
            try:
                st = path.stat()
            except FileNotFoundError:
                del self._pending[path]
                continue
            signature = (st.st_size, st.st_mtime_ns)
            if signature != seen:
                self._pending[path] = (signature, now)
            elif st.st_size > 0 and now - since >= self.stable_s:
                del self._pending[path]
                done.append((path, st.st_size, st.st_mtime_ns))
        return done


def file_event(root: Path, path: Path, size: int, mtime_ns: int) -> Event:
    """The `audio.file.created` event of one file under `root` (an absolute, resolved path)."""
    file_id = path.relative_to(root).as_posix()
    resource_id = f"audio.file.{root.as_posix()}/{file_id}"
    return Event(
        event=EVENT_NAME,
        # The same file version always gets the same id: a batch resent after a lost answer is
        # stored once (the server's events table is keyed by id).
        id=uuid.uuid5(_EVENT_NAMESPACE, f"{resource_id}:{size}:{mtime_ns}"),
        resource={
            "prefect.resource.id": resource_id,
            "prefect.resource.name": file_id,
            "audio.root": root.as_posix(),
            "audio.folder": folder_of(file_id),
        },
        payload={"audio_root": root.as_posix(), "folder": folder_of(file_id), "id": file_id, "size": size},
    )


def _audio_under(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Candidate audio files anywhere below `folder` (the pipeline lists the same ones)."""
    found = []
    for dirpath, _, filenames in os.walk(folder):
        found.extend(Path(dirpath, f) for f in filenames if is_candidate(f, extensions))
    return found


def watch(
    audio_root: str | os.PathLike[str],
    *,
    stable_seconds: float = 1.0,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    stop_event: threading.Event | None = None,
    sink: EventSink | None = None,
    poll_ms: int = 250,
) -> int:
    """Emit `audio.file.created` for every audio file written under `audio_root` until stopped.

    Files already there when the watcher starts get no event (start a run by hand for them).
    Hidden, temp (`.part`, `.tmp`, ...) and non-audio files are ignored; a temp file renamed
    to its final name counts as new. Returns on `stop_event` or Ctrl-C, after one last try to
    send what is still queued.

    Args:
        audio_root: the directory to watch (recursively).
        stable_seconds: how long size and mtime must stay unchanged before a file counts as
            completely written.
        extensions: audio suffixes, as in the pipeline settings.
        stop_event: set it to stop the watcher (tests, embedding).
        sink: where events go; default the Prefect API from PREFECT_API_URL.
        poll_ms: how often pending files are checked when nothing else happens.

    Returns:
        The number of events delivered.

    Raises:
        FileNotFoundError: `audio_root` is not a directory.
        WatcherConfigError: no Prefect API is configured (default sink only).
    """
    root = Path(audio_root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"audio root not found or not a directory: {audio_root}")
    exts = tuple(e.lower() for e in extensions)
    outbox = Outbox(sink if sink is not None else PrefectEventSink())
    tracker = StabilityTracker(stable_seconds)

    def audio_or_folder(change: watchfiles.Change, path: str) -> bool:
        if is_candidate(path, exts):
            return True
        # A folder moved in whole brings no event for the files inside it, and the files of a
        # new folder can be written before the watch on it starts: scan new folders.
        return change == watchfiles.Change.added

    changes_seen = watchfiles.watch(
        root, watch_filter=audio_or_folder, debounce=max(poll_ms, 100), step=50, rust_timeout=poll_ms,
        yield_on_timeout=True, stop_event=stop_event, raise_interrupt=False,
    )
    started = False
    try:
        for changes in changes_seen:
            if not started:  # the first yield comes once the OS watches are in place
                logger.info("watching %s for new audio files (%s)", root, ", ".join(exts))
                started = True
            now = time.monotonic()
            for change, raw in changes:
                path = Path(raw)
                if change == watchfiles.Change.deleted:
                    tracker.removed(path)
                elif path.is_dir():
                    for found in _audio_under(path, exts):
                        tracker.touched(found, now)
                elif is_candidate(raw, exts):
                    tracker.touched(path, now)
            for path, size, mtime_ns in tracker.complete(now):
                event = file_event(root, path, size, mtime_ns)
                logger.info("new audio file %s (%d bytes)", event.payload["id"], size)
                outbox.add(event)
            outbox.flush(now)
    except KeyboardInterrupt:  # Ctrl-C while sending rather than inside watchfiles
        pass
    finally:
        changes_seen.close()
        outbox.flush(time.monotonic(), force=True)
        if len(outbox):
            logger.warning("stopped with %d event(s) not delivered; run the deployment by hand", len(outbox))
        logger.info("stopped watching %s (%d events sent)", root, outbox.delivered)
    return outbox.delivered

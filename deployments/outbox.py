"""The watcher's outbox: events waiting for the Prefect API, kept on disk so a restart loses none.

Files in the state directory (one per watched root):
- `outbox.jsonl`: a header line `{"generation": g}`, then one event per line, appended and
  fsynced before the event counts as queued;
- `outbox.cursor`: `{"generation": g, "offset": n}`, the bytes of `outbox.jsonl` already
  delivered (or parked), replaced atomically after each answered batch. A cursor of another
  generation is stale and means "nothing delivered": the outbox is compacted by writing a new
  file with the next generation and renaming it over the old one, so no crash between the two
  writes can make the cursor skip an event;
- `parked.jsonl`: events the API refused (4xx), one per line with the status and the reason.
  They are kept for a person to look at and never block the events behind them;
- `lock`: held while a watcher uses the directory (two watchers on one outbox would send twice).

Delivery (`Outbox.flush`): batches in order. Connection errors, 5xx, and the answers that mean
"not now" or "wrong setup" (401, 403, 404, 408, 425, 429) are retried with backoff, since every
event would get them. Any other 4xx refuses this batch's content: the batch is halved until the
refused event is alone, and that event is parked; the ones around it are sent. A resent event
is stored once by the server (the watcher's event ids are deterministic).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import httpx
from prefect.events import Event

logger = logging.getLogger(__name__)

OUTBOX, CURSOR, PARKED, LOCK = "outbox.jsonl", "outbox.cursor", "parked.jsonl", "lock"
# 4xx answers that every event would get (setup, auth, overload): retried, never parked.
RETRIED_4XX = frozenset({401, 403, 404, 408, 425, 429})


class WatcherConfigError(ValueError):
    """The watcher cannot start with this configuration (no API, state directory in use, ...)."""


class EventSink(Protocol):
    def send(self, events: Sequence[Event]) -> None:
        """Deliver all `events` or raise `httpx.HTTPError`."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _line(obj: object) -> bytes:
    # ensure_ascii: a name that slipped through with lone surrogates still encodes.
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")


class OutboxFile:
    """The outbox's files in `directory` (see the module docstring); holds the directory's lock."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK, "a+b")  # noqa: SIM115 (held for the object's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise WatcherConfigError(
                f"another watcher is using the state directory {self.dir}; stop it first, or give "
                "this one its own (AUDIO_PIPELINE_WATCH_STATE_DIR)"
            ) from None
        self.generation = 0
        self.offset = 0  # bytes of outbox.jsonl delivered or parked
        self.pending_sizes: deque[int] = deque()  # byte length of each pending line, in order
        self._out: object | None = None

    def load(self) -> list[Event]:
        """The events a previous watcher left undelivered; compacts the outbox to just them."""
        pending: list[Event] = []
        path = self.dir / OUTBOX
        if path.exists():
            data = path.read_bytes()
            header, _, body = data.partition(b"\n")
            try:
                generation = int(json.loads(header)["generation"])
            except (ValueError, KeyError, TypeError):
                generation, body = 0, data  # not ours or torn: read every line as an event
            start = 0
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                cursor = json.loads((self.dir / CURSOR).read_bytes())
                if int(cursor["generation"]) == generation:
                    start = max(0, int(cursor["offset"]) - len(header) - 1)
            for raw in body[start:].splitlines():
                try:
                    pending.append(Event.model_validate_json(raw))
                except ValueError as e:  # a line torn by a crash mid-append: its file was never sent
                    logger.warning("outbox %s: dropped an unreadable line (%s)", path, str(e).splitlines()[0])
            self.generation = generation
        self._rewrite(pending)
        if pending:
            logger.info("outbox %s: %d event(s) from before the restart to send", path, len(pending))
        return pending

    def _rewrite(self, events: Sequence[Event]) -> None:
        """Replace outbox.jsonl with `events` under the next generation (the old cursor goes stale)."""
        if self._out is not None:
            self._out.close()
        self.generation += 1
        header = _line({"generation": self.generation})
        lines = [_line(e.model_dump(mode="json")) for e in events]
        _replace(self.dir / OUTBOX, header + b"".join(lines))
        self.offset = len(header)
        self.pending_sizes = deque(len(line) for line in lines)
        self._out = open(self.dir / OUTBOX, "ab")  # noqa: SIM115

    def append(self, events: Iterable[Event]) -> None:
        """Append and fsync: once this returns, the events survive a crash."""
        lines = [_line(e.model_dump(mode="json")) for e in events]
        if not lines:
            return
        self._out.write(b"".join(lines))
        self._out.flush()
        os.fsync(self._out.fileno())
        self.pending_sizes.extend(len(line) for line in lines)

    def done(self, n: int) -> None:
        """The first `n` pending events were delivered or parked: move the cursor past them."""
        for _ in range(n):
            self.offset += self.pending_sizes.popleft()
        if not self.pending_sizes:
            self._rewrite([])  # empty: start a fresh, short file
        else:
            _replace(self.dir / CURSOR, _line({"generation": self.generation, "offset": self.offset}))

    def park(self, event: Event, status: int, reason: str) -> None:
        record = {"parked_at": datetime.now(timezone.utc).isoformat(), "status": status, "reason": reason,
                  "event": event.model_dump(mode="json")}
        with open(self.dir / PARKED, "ab") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        self._lock.close()  # releases the lock


def _refused_status(error: httpx.HTTPError) -> int | None:
    """The status of an answer that refuses this batch's content (park it), else None (retry)."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        if 400 <= status < 500 and status not in RETRIED_4XX:
            return status
    return None


def _reason(error: httpx.HTTPError) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"{error.response.status_code}: {error.response.text[:500]}"
    return str(error)


class Outbox:
    """Events waiting for delivery, kept in `store`, sent in order (see the module docstring)."""

    def __init__(self, sink: EventSink, store: OutboxFile, first_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, batch_size: int = 200) -> None:
        self.sink = sink
        self.store = store
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.batch_size = batch_size
        self._events: deque[Event] = deque(store.load())
        self._limit = batch_size  # halved while looking for the event a 4xx refused
        self._next_try = 0.0
        self._backoff = first_backoff_s
        self._failing_since: float | None = None
        self.delivered = 0
        self.parked = 0

    def __len__(self) -> int:
        return len(self._events)

    def queued(self) -> list[Event]:
        return list(self._events)

    def add(self, events: Sequence[Event]) -> None:
        self.store.append(events)
        self._events.extend(events)

    def flush(self, now: float, force: bool = False) -> None:
        """Send what is queued unless a retry is not due yet (`force`: try now); never raises on HTTP errors."""
        while self._events and (force or now >= self._next_try):
            batch = [self._events[i] for i in range(min(self._limit, len(self._events)))]
            try:
                self.sink.send(batch)
            except httpx.HTTPError as e:
                if (status := _refused_status(e)) is None:
                    self._retry_later(now, e)
                    return
                if len(batch) > 1:  # find the refused event: the others must still go
                    self._limit = len(batch) // 2
                    continue
                self.store.park(batch[0], status, _reason(e))
                self._done(1)
                self.parked += 1
                logger.error(
                    "Prefect API refused the event for %s (%s); parked in %s, going on with the next",
                    batch[0].resource.id, _reason(e), self.store.dir / PARKED,
                )
                continue
            self._done(len(batch))
            self.delivered += len(batch)
            if self._failing_since is not None:
                logger.warning("Prefect API back after %.0f s; sending the queued events", now - self._failing_since)
            self._failing_since = None
            self._backoff = self.first_backoff_s
            self._next_try = 0.0
            self._limit = self.batch_size

    def _done(self, n: int) -> None:
        for _ in range(n):
            self._events.popleft()
        self.store.done(n)

    def _retry_later(self, now: float, e: httpx.HTTPError) -> None:
        status = e.response.status_code if isinstance(e, httpx.HTTPStatusError) else None
        if self._failing_since is None:
            self._failing_since = now
            hint = ""
            if status in (401, 403):
                hint = " (set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING)"
            elif status == 404:
                hint = " (PREFECT_API_URL must end in /api)"
            logger.warning("Prefect API unreachable (%s)%s; %d event(s) queued in %s, retrying",
                           _reason(e), hint, len(self), self.store.dir / OUTBOX)
        else:
            logger.debug("Prefect API still unreachable (%s); retry in %.1f s", e, self._backoff)
        self._next_try = now + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff_s)

"""Announced files are watched until a run has covered them; after a failed run they are announced again.

A triggered run can fail before or during its work (the Whisper service down, a worker
killed): its files would then wait for the next new file or a person. The watcher keeps the
time and id of every file it announced; every `recheck_seconds` it asks the Prefect API for the
runs of the pipeline flow over its root that started since the oldest of them:

- a Completed run covers every file announced before it started (the run listed the root
  after those files were complete): they are forgotten;
- a Failed run tagged `refused` (allow-list, owner, bad settings: the same run would be refused
  again) also ends the wait, with one ERROR line: its files are not announced again, so a
  refused root is never retried in a loop;
- if the latest run over the root ended Failed or Crashed and files remain, the newest of them
  is announced again (a fresh event, so the trigger starts a run that lists the whole root),
  after `retry_seconds`, doubling per failed run up to 30 min, at most `retries` times in a
  row; then one ERROR line says so and the files wait for a person.

Runs are matched by `audio_root` (the trigger passes the watcher's resolved root). Cancelled
runs are a person's choice and are not retried. The list is kept in memory: a watcher
restarted after a failed run does not know that run's files (events still in its outbox are
re-sent, and so tracked).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Protocol

import httpx
from prefect.client.orchestration import get_client
from prefect.events import Event
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

logger = logging.getLogger(__name__)

FLOW_NAME = "parallel-transcribe-tokenise"  # flows.pipeline's flow (not imported: the watcher stays light)
MAX_RETRY_DELAY = timedelta(minutes=30)
RUNS_PAGE = 200
REFUSED_TAG = "refused"  # flows.pipeline.REFUSED_TAG


@dataclass(frozen=True)
class RunSeen:
    """What the watcher needs of one flow run over its root."""

    id: str
    state_type: str  # COMPLETED, FAILED, CRASHED, CANCELLED, RUNNING, ...
    state_name: str
    message: str
    start_time: datetime
    end_time: datetime | None
    tags: tuple[str, ...] = ()  # `refused`: the flow's mark for a run that would be refused again

    @property
    def final(self) -> bool:
        return self.state_type in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    @property
    def refused(self) -> bool:
        return self.state_type == "FAILED" and REFUSED_TAG in self.tags

    @property
    def retryable(self) -> bool:
        return self.state_type in ("FAILED", "CRASHED") and not self.refused


class RunSource(Protocol):
    def runs_since(self, root: Path, since: datetime) -> list[RunSeen]:
        """Runs of the pipeline flow over `root` started at or after `since`, oldest first; raises httpx.HTTPError."""


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def is_run_of(parameters: dict, root: Path) -> bool:
    audio_root = str(parameters.get("audio_root") or "")
    if audio_root.rstrip("/") == root.as_posix():
        return True
    return os.path.isabs(audio_root) and os.path.realpath(audio_root) == str(root)


def run_seen(raw: dict) -> RunSeen:
    state = raw.get("state") or {}
    return RunSeen(
        id=str(raw["id"]), state_type=str(raw.get("state_type") or state.get("type") or ""),
        state_name=str(raw.get("state_name") or state.get("name") or ""), message=str(state.get("message") or ""),
        start_time=_time(raw["start_time"]), end_time=_time(raw.get("end_time")), tags=tuple(raw.get("tags") or ()),
    )


class PrefectRuns:
    """Flow runs from the configured Prefect API (`POST /flow_runs/filter`), through Prefect's client."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.timeout_s = timeout_s

    def runs_since(self, root: Path, since: datetime) -> list[RunSeen]:
        body = {
            "flows": {"name": {"any_": [FLOW_NAME]}},
            "flow_runs": {"start_time": {"after_": since.isoformat(), "is_null_": False}},
            "sort": "START_TIME_DESC", "limit": RUNS_PAGE,
        }
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
            with get_client(sync_client=True, httpx_settings={"timeout": self.timeout_s}) as client:
                raw = client.request("POST", "/flow_runs/filter", json=body).json()
        runs = [run_seen(r) for r in raw if r.get("start_time") and is_run_of(r.get("parameters") or {}, root)]
        return sorted(runs, key=lambda r: r.start_time)


class Confirmations:
    """Announced files not yet covered by a Completed run, and what to do about them (module docstring)."""

    def __init__(self, root: Path, retry_s: float, retries: int) -> None:
        self.root = root
        self.retry = timedelta(seconds=retry_s)
        self.retries = retries
        self.pending: deque[tuple[datetime, str]] = deque()  # (announced at, file id), oldest first
        self.failed_in_a_row = 0
        self.answered: set[str] = set()  # failed runs already answered with a re-announcement

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def oldest(self) -> datetime | None:
        return self.pending[0][0] if self.pending else None

    def announced(self, events: Iterable[Event]) -> None:
        for event in events:
            if event.payload.get("attempt"):  # a re-announcement: its files are pending already
                continue
            entry = (event.occurred.astimezone(timezone.utc), str(event.payload["id"]))
            if self.pending and entry[0] < self.pending[-1][0]:  # from an outbox: keep the order
                self.pending = deque(sorted([*self.pending, entry]))
            else:
                self.pending.append(entry)

    def _forget_until(self, t: datetime) -> int:
        n = 0
        while self.pending and self.pending[0][0] <= t:
            self.pending.popleft()
            n += 1
        return n

    def update(self, runs: Sequence[RunSeen], now: datetime) -> str | None:
        """Forget what finished runs covered; the id of a file to announce again, or None."""
        for run in runs:
            if run.state_type == "COMPLETED":
                if self._forget_until(run.start_time):
                    self.failed_in_a_row = 0
            elif run.refused and (n := self._forget_until(run.start_time)):
                logger.error(
                    "run %s over %s was refused (%s); its %d file(s) are not announced again: fix that, then "
                    "copy a file or start a run by hand", run.id, self.root, run.message, n,
                )
        if not self.pending or not runs:
            return None
        latest = runs[-1]
        if not latest.retryable or latest.id in self.answered or latest.start_time < self.oldest:
            return None  # running, covered, cancelled, answered, or older than the files: wait
        if self.failed_in_a_row >= self.retries:
            logger.error(
                "%d run(s) in a row over %s failed, the last %s (%s); %d announced file(s) wait for a run started "
                "by hand", self.failed_in_a_row, self.root, latest.id, latest.message, len(self.pending),
            )
            self.answered.add(latest.id)
            self.pending.clear()
            return None
        delay = min(self.retry * 2**self.failed_in_a_row, MAX_RETRY_DELAY)
        if now < (latest.end_time or latest.start_time) + delay:
            return None
        self.answered.add(latest.id)
        self.failed_in_a_row += 1
        logger.warning(
            "run %s over %s ended %s (%s): announcing its %d file(s) again (%d of %d)", latest.id, self.root,
            latest.state_name, latest.message, len(self.pending), self.failed_in_a_row, self.retries,
        )
        return self.pending[-1][1]


class Recheck:
    """Asks `source` every `every_s` seconds while announced files are pending; never raises on HTTP errors."""

    def __init__(self, root: Path, source: RunSource, every_s: float, retry_s: float, retries: int) -> None:
        self.root = root
        self.source = source
        self.every_s = every_s
        self.confirmations = Confirmations(root, retry_s, retries)
        self._next = 0.0
        self._failing = False

    def poll(self, monotonic_now: float) -> str | None:
        """The id of a file to announce again, when a check is due and says so."""
        if not self.confirmations:  # nothing pending: the first check comes `every_s` after an announcement
            self._next = monotonic_now + self.every_s
            return None
        if monotonic_now < self._next:
            return None
        self._next = monotonic_now + self.every_s
        try:
            runs = self.source.runs_since(self.root, self.confirmations.oldest - timedelta(seconds=1))
        except (httpx.HTTPError, ValueError, KeyError) as e:
            if not self._failing:
                logger.warning("could not ask the Prefect API about runs over %s (%s); trying again", self.root, e)
            self._failing = True
            return None
        self._failing = False
        return self.confirmations.update(runs, datetime.now(timezone.utc))

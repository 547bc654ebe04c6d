"""Gather concurrent transcription requests into batched engine calls, within bounded queues.

Why: a GPU decodes 8 short clips in about the time of one, but HTTP clients send one clip per
request. The batcher holds the first waiting request up to `max_wait_ms` (or until
`max_batch_size` are waiting), then runs ONE engine call in a worker thread, so the event loop
keeps serving. While a call runs, new requests queue up and form the next batch, so under load
batches fill without any added wait.

Two lanes, each with its own bounded queue, workers and threads:
- `short`: clips of at most one 30 s Whisper window, batched; `workers` engine calls may run
  at once (each gathers its own batch), for engines that run calls side by side (faster-whisper
  on a multi-core CPU: two one-thread calls keep both cores busy through the decoder's small
  matrix products, where one two-thread call leaves one idle much of the time);
- `long`: longer clips, one per call (the engine walks their windows one after another), so a
  long clip never rides inside a batch of short ones nor holds up the queue behind it. The lanes
  only run side by side as far as the engine allows: faster-whisper (CTranslate2) interleaves
  the calls; an engine that takes one lock per call serialises them.

Overload and abandonment, so the service never works for nobody:
- past `max_queue` waiting clips in a lane, `transcribe` raises `QueueFullError` at once (the
  app answers 429 with `Retry-After`); `admit(lane_for(seconds))` asks the same question before
  the upload is decoded, so a request that would be refused costs no decoding or resampling;
- a request whose client has disconnected (`is_disconnected()` true) is dropped just before its
  engine call; a request whose awaiting coroutine is cancelled leaves the queue at once.

Requests are grouped by (language, options); every request gets its own result or exception:
when a batched call raises, its clips are retried one by one so one bad clip cannot fail its
neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from whisper_service.audio import SAMPLE_RATE
from whisper_service.engines.base import WINDOW_SAMPLES, Engine, Transcript

logger = logging.getLogger(__name__)

LaneName = Literal["short", "long"]
LANES: tuple[LaneName, ...] = ("short", "long")
DisconnectCheck = Callable[[], Awaitable[bool]]
DEFAULT_MAX_QUEUE = 64


class BatcherObserver(Protocol):
    """What the batcher reports (ServiceMetrics implements it)."""

    def observe_batch(self, size: int, seconds: float) -> None: ...

    def rejected(self, lane: str) -> None: ...

    def abandoned(self, reason: str) -> None: ...


@dataclass(eq=False)
class _Request:
    audio: np.ndarray
    language: str | None
    options: Hashable | None
    future: asyncio.Future[Transcript] = field(repr=False)
    is_disconnected: DisconnectCheck | None = field(default=None, repr=False)


class BatcherClosedError(RuntimeError):
    """The batcher was stopped (service shutting down) before this request ran."""


class QueueFullError(RuntimeError):
    """The lane's queue is full: the client should retry after `retry_after_s` seconds."""

    def __init__(self, lane: str, depth: int, retry_after_s: int) -> None:
        super().__init__(
            f"the service is overloaded: {depth} clips already wait in the {lane} queue; "
            f"retry after {retry_after_s} s"
        )
        self.lane, self.depth, self.retry_after_s = lane, depth, retry_after_s


class ClientGoneError(RuntimeError):
    """The client disconnected before its clip reached the engine (nobody reads this answer)."""


class _Lane:
    """One queue, `workers` worker tasks, as many engine threads."""

    def __init__(self, name: LaneName, max_batch_size: int, max_queue: int, workers: int = 1) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.workers = workers
        self.pending: deque[_Request] = deque()
        self.running: set[_Request] = set()  # requests whose engine call is in flight
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"whisper-{name}")
        self.tasks: list[asyncio.Task[None]] = []
        self.call_seconds = 1.0  # moving average of one engine call, for Retry-After


class Batcher:
    """Async front of an `Engine`: `await batcher.transcribe(audio, language)`.

    Use inside a running event loop: `start()` once, `await stop()` at shutdown.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        max_wait_ms: float = 10,
        observer: BatcherObserver | Callable[[int, float], None] | None = None,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        workers: int = 1,
    ) -> None:
        """`workers`: engine calls in flight at once in the short lane (the engine must allow
        that many concurrent `transcribe` calls; see `engine_workers`)."""
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1 or workers < 1:
            raise ValueError("max_batch_size, max_queue and workers must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        # a bare callable is the older `observe_batch(size, seconds)` hook
        self._observer = observer if observer is None or hasattr(observer, "rejected") else None
        self._observe_batch = (
            observer.observe_batch if self._observer is not None else observer  # type: ignore[union-attr]
        )
        self._lanes: dict[LaneName, _Lane] = {
            "short": _Lane("short", max_batch_size, max_queue, workers),
            "long": _Lane("long", 1, max_queue),
        }
        self._closed = False
        self._started = False

    def start(self) -> None:
        if not self._started:
            loop = asyncio.get_running_loop()
            for lane in self._lanes.values():
                lane.tasks = [
                    loop.create_task(self._run(lane), name=f"whisper-batcher-{lane.name}-{k}")
                    for k in range(lane.workers)
                ]
            self._started = True

    @staticmethod
    def lane_for(seconds: float) -> LaneName:
        """The lane a clip of `seconds` goes to (the rule `transcribe` applies to its samples)."""
        return "long" if seconds * SAMPLE_RATE > WINDOW_SAMPLES else "short"

    def admit(self, lane: LaneName) -> None:
        """Raise `QueueFullError` now if `lane` is full; otherwise return (nothing is reserved).

        Cheap (no lock, no await): call it with the lane from the upload's header (frames /
        sample rate) BEFORE decoding, so a refused request costs no decode or resample.
        `transcribe` checks again, since the queue may fill while the clip decodes.
        """
        self._admit(self._lanes[lane])

    def depth(self, lane: LaneName) -> int:
        """Clips waiting in `lane` (not counting the batch being transcribed)."""
        return len(self._lanes[lane].pending)

    async def stop(self) -> None:
        """Fail queued requests, let running engine calls finish, release the threads."""
        self._closed = True
        for lane in self._lanes.values():
            for task in lane.tasks:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            for request in [*lane.running, *lane.pending]:
                _resolve(request.future, BatcherClosedError("service is shutting down"))
            lane.pending.clear()
        for lane in self._lanes.values():
            await asyncio.to_thread(lane.executor.shutdown, wait=True)

    async def transcribe(
        self,
        audio: np.ndarray,
        language: str | None = None,
        options: Hashable | None = None,
        is_disconnected: DisconnectCheck | None = None,
    ) -> Transcript:
        """Queue one clip and wait for its own Transcript (or its own exception).

        Args:
            options: decode options (hashable, e.g. a frozen model) passed to the engine as its
                third argument; None calls `engine.transcribe(batch, language)`.
            is_disconnected: awaited just before the engine call; True drops the request
                (`ClientGoneError`), so a client that went away costs no engine time.

        Raises:
            QueueFullError: the lane's queue is full (answer 429).
            BatcherClosedError: the batcher is not running.
        """
        if self._closed or not self._started:
            raise BatcherClosedError("batcher is not running")
        lane = self._lanes["long" if len(audio) > WINDOW_SAMPLES else "short"]
        self._admit(lane)
        loop = asyncio.get_running_loop()
        request = _Request(audio, language, options, loop.create_future(), is_disconnected)
        lane.pending.append(request)
        lane.wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:  # the handler was cancelled: leave the queue now
            if request in lane.pending:
                lane.pending.remove(request)
                self._abandoned("cancelled")
            raise

    def _admit(self, lane: _Lane) -> None:
        if len(lane.pending) >= lane.max_queue:
            if self._observer is not None:
                self._observer.rejected(lane.name)
            raise QueueFullError(lane.name, len(lane.pending), self._retry_after(lane))

    def _retry_after(self, lane: _Lane) -> int:
        """Seconds until the queue has room, roughly: its batches times one call's duration."""
        batches = math.ceil(len(lane.pending) / (lane.max_batch_size * lane.workers))
        return max(1, min(60, math.ceil(batches * lane.call_seconds)))

    def _abandoned(self, reason: str) -> None:
        if self._observer is not None:
            self._observer.abandoned(reason)

    async def _run(self, lane: _Lane) -> None:
        while True:
            gathered = await self._gather(lane)
            lane.running.update(gathered)  # left there if cancelled: stop() answers them
            batch = await self._drop_disconnected(gathered)
            for (language, options), requests in _by_key(batch).items():
                await self._execute(lane, requests, language, options)
            lane.running.difference_update(gathered)

    async def _gather(self, lane: _Lane) -> list[_Request]:
        """Wait for a first request, then for company until the deadline or a full batch.

        With several workers another one may take the waiting requests first: then wait again.
        """
        while True:
            while not lane.pending:
                lane.wakeup.clear()
                await lane.wakeup.wait()
            deadline = time.monotonic() + self.max_wait
            while len(lane.pending) < lane.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                lane.wakeup.clear()
                try:
                    # Waiting on an Event (not a Queue.get) is safe to time out: nothing is lost.
                    await asyncio.wait_for(lane.wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = []
            while lane.pending and len(batch) < lane.max_batch_size:
                request = lane.pending.popleft()
                if not request.future.done():  # skip clients that went away while queued
                    batch.append(request)
            if batch:
                return batch

    async def _drop_disconnected(self, batch: list[_Request]) -> list[_Request]:
        """Ask each request's connection, just before the engine call, whether anyone waits."""

        async def gone(request: _Request) -> bool:
            if request.is_disconnected is None:
                return False
            try:
                return bool(await request.is_disconnected())
            except Exception:  # a broken check must not fail the batch: assume still there
                logger.exception("is_disconnected check failed")
                return False

        flags = await asyncio.gather(*(gone(r) for r in batch))
        kept = []
        for request, left in zip(batch, flags, strict=True):
            if left:
                self._abandoned("disconnected")
                _resolve(request.future, ClientGoneError("client disconnected before transcription"))
            else:
                kept.append(request)
        return kept

    async def _execute(
        self, lane: _Lane, requests: list[_Request], language: str | None, options: Hashable | None
    ) -> None:
        try:
            transcripts = await self._call_engine(lane, [r.audio for r in requests], language, options)
        except Exception as error:  # forwarded to the callers, never swallowed
            if len(requests) > 1:
                logger.warning(
                    "batch of %d failed (%s); retrying clips one by one", len(requests), error
                )
                for request in requests:
                    await self._execute(lane, [request], language, options)
                return
            _resolve(requests[0].future, error)
            return
        for request, transcript in zip(requests, transcripts):
            _resolve(request.future, transcript)

    async def _call_engine(
        self, lane: _Lane, audio: list[np.ndarray], language: str | None, options: Hashable | None
    ) -> list[Transcript]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        # Until every engine takes decode options, call the two-argument form when there are none.
        args = (audio, language) if options is None else (audio, language, options)
        try:
            transcripts = await loop.run_in_executor(lane.executor, self.engine.transcribe, *args)
        finally:
            seconds = time.perf_counter() - start
            lane.call_seconds = 0.8 * lane.call_seconds + 0.2 * seconds
            if self._observe_batch is not None:
                self._observe_batch(len(audio), seconds)
        if len(transcripts) != len(audio):
            raise RuntimeError(
                f"engine returned {len(transcripts)} transcripts for {len(audio)} clips"
            )
        return transcripts


def _by_key(batch: list[_Request]) -> dict[tuple[str | None, Hashable | None], list[_Request]]:
    groups: dict[tuple[str | None, Hashable | None], list[_Request]] = {}
    for request in batch:
        groups.setdefault((request.language, request.options), []).append(request)
    return groups


def _resolve(future: asyncio.Future[Transcript], outcome: Transcript | Exception) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

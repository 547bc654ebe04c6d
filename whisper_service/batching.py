"""Gather concurrent transcription requests into batched engine calls.

Why: a GPU decodes 8 short clips in about the time of one, but HTTP clients send one clip per
request. The batcher holds the first waiting request up to `max_wait_ms` (or until
`max_batch_size` are waiting), then runs ONE `engine.transcribe(batch, language)` call in a
dedicated worker thread, so the event loop keeps serving and the engine, which is not
thread-safe, only ever sees one call at a time. While a call runs, new requests queue up and
form the next batch, so under load batches fill without any added wait.

Requests are grouped by language (one engine call per language in a gathered batch). Every
request gets its own result or exception: when a batched call raises, its clips are retried
one by one so one bad clip cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from whisper_service.decode_options import DecodeOptions
from whisper_service.engines.base import Engine, Transcript

logger = logging.getLogger(__name__)

BatchObserver = Callable[[int, float], None]  # (batch size, engine seconds)


@dataclass
class _Request:
    audio: np.ndarray
    language: str | None
    future: asyncio.Future[Transcript] = field(repr=False)
    options: DecodeOptions | None = None  # None: the engine's defaults


class BatcherClosedError(RuntimeError):
    """The batcher was stopped (service shutting down) before this request ran."""


class Batcher:
    """Async front of an `Engine`: `await batcher.transcribe(audio, language)`.

    Use inside a running event loop: `start()` once, `await stop()` at shutdown.
    """

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 8,
        max_wait_ms: float = 10,
        observe_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._observe = observe_batch
        self._pending: deque[_Request] = deque()
        self._running: list[_Request] = []  # the batch whose engine call is in flight
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper-engine")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._worker is None:
            loop = asyncio.get_running_loop()
            self._worker = loop.create_task(self._run(), name="whisper-batcher")

    async def stop(self) -> None:
        """Fail queued requests, let a running engine call finish, release the thread."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for request in [*self._running, *self._pending]:
            _resolve(request.future, BatcherClosedError("service is shutting down"))
        self._pending.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def transcribe(
        self, audio: np.ndarray, language: str | None = None, options: DecodeOptions | None = None
    ) -> Transcript:
        """Queue one clip and wait for its own Transcript (or its own exception)."""
        if self._closed or self._worker is None:
            raise BatcherClosedError("batcher is not running")
        request = _Request(audio, language, asyncio.get_running_loop().create_future(), options)
        self._pending.append(request)
        self._wakeup.set()
        return await request.future

    async def _run(self) -> None:
        while True:
            self._running = await self._gather()
            for (language, options), requests in _by_language(self._running).items():
                await self._execute(requests, language, options)
            self._running = []

    async def _gather(self) -> list[_Request]:
        """Wait for a first request, then for company until the deadline or a full batch."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = time.monotonic() + self.max_wait
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                # Waiting on an Event (not a Queue.get) is safe to time out: nothing is lost.
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch = []
        while self._pending and len(batch) < self.max_batch_size:
            request = self._pending.popleft()
            if not request.future.done():  # skip clients that went away while queued
                batch.append(request)
        return batch

    async def _execute(
        self, requests: list[_Request], language: str | None, options: DecodeOptions | None = None
    ) -> None:
        try:
            transcripts = await self._call_engine([r.audio for r in requests], language, options)
        except Exception as error:  # forwarded to the callers, never swallowed
            if len(requests) > 1:
                logger.warning(
                    "batch of %d failed (%s); retrying clips one by one", len(requests), error
                )
                for request in requests:
                    await self._execute([request], language, options)
                return
            _resolve(requests[0].future, error)
            return
        for request, transcript in zip(requests, transcripts):
            _resolve(request.future, transcript)

    async def _call_engine(
        self, audio: list[np.ndarray], language: str | None, options: DecodeOptions | None = None
    ) -> list[Transcript]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            transcripts = await loop.run_in_executor(
                self._executor, self.engine.transcribe, audio, language, options
            )
        finally:
            if self._observe is not None:
                self._observe(len(audio), time.perf_counter() - start)
        if len(transcripts) != len(audio):
            raise RuntimeError(
                f"engine returned {len(transcripts)} transcripts for {len(audio)} clips"
            )
        return transcripts


def _by_language(
    batch: list[_Request],
) -> dict[tuple[str | None, DecodeOptions | None], list[_Request]]:
    groups: dict[tuple[str | None, DecodeOptions | None], list[_Request]] = {}
    for request in batch:  # one engine call per (language, decode options)
        groups.setdefault((request.language, request.options), []).append(request)
    return groups


def _resolve(future: asyncio.Future[Transcript], outcome: Transcript | Exception) -> None:
    if future.done():  # the client went away and its handler was cancelled
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

"""Give up on a Dask cluster that has no workers, instead of waiting for them forever.

Dask keeps tasks queued until a worker appears, which is right for an autoscaling cluster
and wrong for a batch run whose workers were all lost: the run would hang with nothing to
say. The watchdog polls the scheduler; after `timeout_s` without a single worker it sets
`gave_up`, cancels what is still queued, and the flow reports those files as failed (their
intermediates are kept, so a rerun does exactly what is missing).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator

from prefect.futures import PrefectFuture


class NoWorkersWatchdog:
    """Sets `gave_up` once the scheduler behind `client` has had no workers for `timeout_s`."""

    def __init__(self, client, timeout_s: float, poll_s: float = 2.0) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.poll_s = min(poll_s, timeout_s)
        self.gave_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="no-workers-watchdog", daemon=True)

    def __enter__(self) -> NoWorkersWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _workers(self) -> int:
        try:
            return len(self.client.nthreads())
        except Exception:  # scheduler unreachable: as good as no workers
            return 0

    def _watch(self) -> None:
        idle_since: float | None = None
        while not self._stop.wait(self.poll_s):
            if self._workers():
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= self.timeout_s:
                self.gave_up.set()
                return

    def cancel(self, futures: Iterable[PrefectFuture]) -> None:
        """Best effort: a queued task must not start on a worker that joins after we gave up."""
        wrapped = [f.wrapped_future for f in futures if hasattr(f, "wrapped_future")]
        with contextlib.suppress(Exception):
            self.client.cancel(wrapped, force=True)


def finished(futures: list[PrefectFuture], give_up: threading.Event, poll_s: float = 0.5) -> Iterator[PrefectFuture]:
    """Each future as it completes; returns early, leaving the rest, once `give_up` is set."""
    done: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(done.put)
    for _ in range(len(futures)):
        while True:
            try:
                yield done.get(timeout=poll_s)
                break
            except queue.Empty:
                if give_up.is_set():
                    return

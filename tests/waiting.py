"""Polling with a bound, for tests that wait on real processes and servers."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(check: Callable[[], object], timeout_s: float, what: str, every: float = 0.1,
               explain: Callable[[], str] = lambda: "") -> object:
    """Poll `check` until it returns something truthy and return that; after `timeout_s` raise
    TimeoutError naming `what`, with `explain()` (e.g. a log tail) below it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            details = explain()
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"\n{details}" if details else ""))
        time.sleep(every)

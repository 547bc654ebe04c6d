"""Read the Whisper service's Prometheus counters, so tests can count real requests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

TRANSCRIBE_ROUTES = {"/transcribe", "/v1/audio/transcriptions"}


def transcribe_requests(url: str) -> int:
    """Transcription requests the service has answered so far (any status)."""
    return sum(transcribe_requests_by_status(url).values())


def requests_in_progress(url: str) -> int:
    """HTTP requests the service has received and not yet answered (its own scrape excluded)."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "whisper_requests_in_progress":
            return int(family.samples[0].value)
    raise AssertionError("the service exports no whisper_requests_in_progress gauge")


def transcribe_requests_by_status(url: str) -> dict[str, int]:
    """Transcription requests the service has answered so far, by HTTP status ("200", "429", ...)."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "whisper_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("route") in TRANSCRIBE_ROUTES:
                status = sample.labels.get("status", "?")
                totals[status] = totals.get(status, 0.0) + sample.value
    return {status: int(n) for status, n in sorted(totals.items())}

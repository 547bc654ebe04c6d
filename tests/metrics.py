"""Read the Whisper service's Prometheus counters, so tests can count real requests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

TRANSCRIBE_ROUTES = {"/transcribe", "/v1/audio/transcriptions"}


def transcribe_requests(url: str) -> int:
    """Transcription requests the service has answered so far (any status)."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "whisper_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("route") in TRANSCRIBE_ROUTES:
                total += sample.value
    return int(total)

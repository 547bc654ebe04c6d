"""Session fixtures shared by every test package: a real Prefect harness and a real service."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEMO_AUDIO = Path(__file__).parents[1] / "flows" / "demo_data" / "audio"
DEMO_REFERENCES = Path(__file__).parents[1] / "flows" / "demo_data" / "references.json"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available: GPU tests run only on a machine with an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real, temporary Prefect server + database for the session (10-15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def whisper_service_url() -> Iterator[str]:
    """The real Whisper service (`audio-pipeline serve`, default engine and model) on loopback."""
    from flows.demo import local_service

    with local_service() as url:
        yield url

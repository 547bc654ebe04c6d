"""Engine fixtures: real weights (the offline tiny.en), real demo audio, loaded once per module."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from whisper_service.app import create_app
from whisper_service.audio import decode_audio
from whisper_service.engines import Engine, load_engine
from whisper_service.engines.convert import CACHE_ENV
from whisper_service.engines.openai_whisper import OpenAIWhisperEngine
from whisper_service.settings import WhisperServiceSettings

DEMO_DATA = Path(__file__).parents[2] / "flows" / "demo_data"


@dataclass(frozen=True)
class DemoClip:
    id: str  # "p225/p225_001_mic2.flac"
    audio: np.ndarray  # mono float32, 16 kHz
    reference: str


@pytest.fixture(scope="module")
def demo_clips() -> list[DemoClip]:
    """Every demo clip, decoded the way the service decodes uploads, sorted by id."""
    references = json.loads((DEMO_DATA / "references.json").read_text())
    return [
        DemoClip(clip_id, decode_audio((DEMO_DATA / "audio" / clip_id).read_bytes()), text)
        for clip_id, text in sorted(references.items())
    ]


@pytest.fixture(scope="module")
def openai_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAIWhisperEngine]:
    """The default engine on CPU, converting into a private cache (never the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("whisper-cache")))
        engine = load_engine("openai-whisper", "tiny.en", device="cpu")
    assert isinstance(engine, OpenAIWhisperEngine)
    yield engine
    engine.close()


# --- Service fixtures (test_app.py): the real app served by uvicorn on 127.0.0.1, port 0. ---

SERVICE_START_TIMEOUT_S = 30


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(SERVICE_START_TIMEOUT_S)


def service_settings(**overrides: object) -> WhisperServiceSettings:
    """Test settings: loopback, port 0, small upload limit, a short batching window."""
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": 0, "max_upload_bytes": 4 * 1024 * 1024, "max_wait_ms": 50,
    }
    return WhisperServiceSettings(**(values | overrides))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def service_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The default engine and model (openai-whisper tiny.en on CPU), in a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("service-whisper-cache")))
        engine = load_engine("openai-whisper", "tiny.en", device="cpu")
    yield engine
    engine.close()


MakeService = Callable[..., str]


@pytest.fixture(scope="module")
def make_service(service_engine: Engine) -> Iterator[MakeService]:
    """Start a service: `make_service(settings=None, engine=..., load=None) -> base URL`.

    By default it serves the shared `service_engine`; pass `engine=None` to load from settings.
    Every service started is stopped at the end of the module.
    """
    with ExitStack() as stack:

        def start(
            settings: WhisperServiceSettings | None = None,
            engine: Engine | None = service_engine,
            load: Callable[[], Engine] | None = None,
        ) -> str:
            app = create_app(settings or service_settings(), engine, load=load)
            return stack.enter_context(serving(app))

        yield start


@pytest.fixture(scope="module")
def service_url(make_service: MakeService) -> str:
    """The service every test in a module shares (default engine, ready once /healthz is 200)."""
    url = make_service()
    wait_ready(url)
    return url


def wait_ready(url: str, timeout_s: float = 60) -> httpx.Response:
    """Poll /healthz until 200; fail with the last answer if it never comes."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.get(f"{url}/healthz", timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response
        time.sleep(0.05)

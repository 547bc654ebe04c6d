"""Backpressure: a bounded queue answers 429 + Retry-After, work for departed clients is dropped,
long clips run in their own lane, and the pipeline's client waits through 429s.

Real uvicorn on 127.0.0.1, real engines. Overload is made deterministic with `GatedEngine`: the
real engine behind a gate the test opens once the situation it wants is reached (it also records
which clips reached the engine). No test relies on timing: every wait has a deadline and says
what it waited for.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from tasks.settings import PipelineSettings
from tasks.transcribe import ServiceClient, ServiceOverloadedError
from tests.whisper_service.conftest import DemoClip, MakeService, service_settings, wait_ready
from whisper_service.batching import Batcher, QueueFullError
from whisper_service.engines import Engine, load_engine
from whisper_service.engines.base import Transcript
from whisper_service.engines.convert import CACHE_ENV
from whisper_service.metrics import ServiceMetrics

DEADLINE_S = 60.0  # generous: the machine may be shared and slow; a wait that passes it fails


class GatedEngine:
    """A real engine whose calls wait for `gate` (closed unless `gated=False`); records the length
    of every clip that reached it, before waiting."""

    def __init__(self, inner: Engine, gated: bool = True) -> None:
        self.inner = inner
        self.name, self.model_name, self.device = inner.name, inner.model_name, inner.device
        self.options = inner.options  # the real engine's decode defaults (/healthz reports them)
        self.seen: list[int] = []
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self._lock = threading.Lock()

    def transcribe(self, batch: list[np.ndarray], language: str | None = None, *options: object) -> list[Transcript]:
        with self._lock:
            self.seen += [len(a) for a in batch]
        if not self.gate.wait(DEADLINE_S):  # never hang a worker thread past the test
            raise RuntimeError(f"the test never opened the engine gate within {DEADLINE_S:.0f} s")
        return self.inner.transcribe(batch, language, *options)

    def close(self) -> None:
        self.gate.set()


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


async def wait_until_async(condition: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


def metric(url: str, family: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for fam in text_string_to_metric_families(text) if fam.name == family
        for sample in fam.samples
        if not sample.name.endswith("_created") and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def flac_bytes(audio: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16_000, format="FLAC")
    return buffer.getvalue()


def silent_flac(samples: int) -> bytes:
    """Silence of a chosen length: a real clip the engine answers "" for without the model."""
    return flac_bytes(np.zeros(samples, np.float32))


async def post_many(url: str, uploads: list[bytes], timeout_s: float = 60) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/transcribe", files={"file": ("c.flac", data)}) for data in uploads)
        )


def test_overload_answers_429_with_retry_after_and_never_5xx(make_service: MakeService, service_engine: Engine):
    """12 clips at a service that holds 1 in the engine + 2 queued: the rest are refused at once.

    The engine is held until every request is accounted for (in the engine, queued or refused),
    so the outcome does not depend on how fast the clients arrive."""
    engine = GatedEngine(service_engine)
    url = make_service(service_settings(max_batch_size=1, max_queue=2, max_wait_ms=0), engine=engine)
    wait_ready(url)
    n = 12
    try:
        with ThreadPoolExecutor(1) as pool:
            posting = pool.submit(asyncio.run, post_many(url, [silent_flac(16_000 + i) for i in range(n)]))

            def accounted() -> bool:
                refused = metric(url, "whisper_rejected", lane="short")
                return len(engine.seen) + metric(url, "whisper_queue_depth", lane="short") + refused == n

            wait_until(accounted, f"all {n} requests to be in the engine, queued or refused")
            engine.gate.set()
            responses = posting.result(timeout=DEADLINE_S)
    finally:
        engine.gate.set()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    rejected = [r for r in responses if r.status_code == 429]
    # 1 in the engine + 2 queued at most; 2 when all arrived before the worker took the first
    assert statuses.count(200) in (2, 3) and len(rejected) == n - statuses.count(200), statuses
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1 and "overloaded" in r.json()["error"]
    assert metric(url, "whisper_rejected", lane="short") == len(rejected)
    assert metric(url, "whisper_errors", reason="overloaded") == len(rejected)
    assert metric(url, "whisper_requests", status="500") == 0
    assert len(engine.seen) == statuses.count(200)  # refused clips never reached the engine
    assert metric(url, "whisper_queue_depth", lane="short") == 0  # drained


def test_disconnected_clients_never_reach_the_engine(make_service: MakeService, service_engine: Engine):
    """Regression (#13): 5 clients timed out at 0.2 s and all 5 clips still went through the engine."""
    engine = GatedEngine(service_engine)
    url = make_service(service_settings(max_batch_size=1, max_wait_ms=0), engine=engine)
    wait_ready(url)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/transcribe", files={"file": ("a.flac", silent_flac(16_000))},
                                timeout=DEADLINE_S)
            wait_until(lambda: engine.seen, "the first clip to reach the engine")
            for i in range(5):  # these wait in the queue behind it (the gate is shut), then give up
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(f"{url}/transcribe", files={"file": ("b.flac", silent_flac(20_000 + i))}, timeout=0.5)
            engine.gate.set()
            assert first.result(timeout=DEADLINE_S).status_code == 200
    finally:
        engine.gate.set()
    wait_until(lambda: metric(url, "whisper_abandoned", reason="disconnected") >= 5,
               "the 5 departed clients' clips to be dropped as disconnected")
    assert engine.seen == [16_000], engine.seen  # only the client that waited got engine time
    assert metric(url, "whisper_abandoned", reason="disconnected") == 5
    assert metric(url, "whisper_queue_depth", lane="short") == 0
    after = httpx.post(f"{url}/transcribe", files={"file": ("c.flac", silent_flac(24_000))}, timeout=DEADLINE_S)
    assert after.status_code == 200 and engine.seen == [16_000, 24_000]


def test_cancelled_request_leaves_the_queue_before_the_engine(service_engine: Engine):
    engine = GatedEngine(service_engine)
    metrics = ServiceMetrics()

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=1, max_wait_ms=0, observer=metrics, max_queue=4)
        batcher.start()
        try:
            running = asyncio.create_task(batcher.transcribe(np.zeros(16_000, np.float32)))
            await wait_until_async(lambda: engine.seen, "the first clip to reach the engine")
            queued = asyncio.create_task(batcher.transcribe(np.zeros(17_000, np.float32)))
            await wait_until_async(lambda: batcher.depth("short") == 1, "the second clip to be queued")
            queued.cancel()
            await asyncio.sleep(0)  # one turn of the loop: the cancelled handler leaves the queue
            assert batcher.depth("short") == 0
            engine.gate.set()
            assert (await asyncio.wait_for(running, DEADLINE_S)).text == ""
        finally:
            engine.gate.set()
            await batcher.stop()

    asyncio.run(scenario())
    assert engine.seen == [16_000]
    assert metrics.abandoned_requests.labels(reason="cancelled")._value.get() == 1


def test_full_queue_raises_before_queueing(service_engine: Engine):
    engine = GatedEngine(service_engine)

    async def scenario() -> tuple[list, int]:
        batcher = Batcher(engine, max_batch_size=1, max_wait_ms=0, max_queue=1)
        batcher.start()
        try:
            tasks = [asyncio.create_task(batcher.transcribe(np.zeros(16_000, np.float32)))]
            await wait_until_async(lambda: engine.seen, "the first clip to reach the engine (queue empty again)")
            tasks += [asyncio.create_task(batcher.transcribe(np.zeros(16_001 + i, np.float32))) for i in range(3)]
            await wait_until_async(lambda: sum(t.done() for t in tasks) == 2, "two clips to find the queue full")
            engine.gate.set()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)
        finally:
            engine.gate.set()
            await batcher.stop()
        return results, len(engine.seen)

    results, calls = asyncio.run(scenario())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    # the first runs, the second waits in the queue (size 1), the rest find it full
    assert len(refused) == 2 and calls == 2
    assert all(r.retry_after_s >= 1 and r.lane == "short" for r in refused)


def test_admit_refuses_a_full_lane_before_any_decoding(service_engine: Engine):
    """`admit(lane_for(seconds))` answers the queue question from a header's length alone, so the
    service can refuse before decoding; it reserves nothing and counts a rejection like transcribe."""
    engine = GatedEngine(service_engine)
    metrics = ServiceMetrics()
    assert Batcher.lane_for(0.5) == Batcher.lane_for(30.0) == "short"
    assert Batcher.lane_for(30.001) == Batcher.lane_for(4 * 3600) == "long"

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=1, max_wait_ms=0, observer=metrics, max_queue=1)
        batcher.start()
        try:
            batcher.admit("short")  # empty: admitted, and nothing reserved
            assert batcher.depth("short") == 0
            running = asyncio.create_task(batcher.transcribe(np.zeros(16_000, np.float32)))
            await wait_until_async(lambda: engine.seen, "the first clip to reach the engine")
            batcher.admit("short")  # the queue is empty again while the first is transcribed
            queued = asyncio.create_task(batcher.transcribe(np.zeros(17_000, np.float32)))
            await wait_until_async(lambda: batcher.depth("short") == 1, "the second clip to be queued")
            with pytest.raises(QueueFullError, match="1 clips already wait in the short queue") as refused:
                batcher.admit(batcher.lane_for(12.0))
            assert refused.value.lane == "short" and refused.value.retry_after_s >= 1
            batcher.admit(batcher.lane_for(90.0))  # the long lane has its own queue
            assert batcher.depth("short") == 1 and batcher.depth("long") == 0
            engine.gate.set()
            await asyncio.wait_for(asyncio.gather(running, queued), DEADLINE_S)
        finally:
            engine.gate.set()
            await batcher.stop()

    asyncio.run(scenario())
    assert engine.seen == [16_000, 17_000]
    assert metrics.rejected_requests.labels(lane="short")._value.get() == 1
    assert metrics.rejected_requests.labels(lane="long")._value.get() == 0


# --- long clips in their own lane ---


@pytest.fixture(scope="module")
def faster_engine(tmp_path_factory: pytest.TempPathFactory):
    """faster-whisper tiny.en int8: CTranslate2 lets two calls overlap, so the lanes run side by side."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("ct2-cache")))
        engine = load_engine("faster-whisper", "tiny.en", device="cpu")
    yield engine
    engine.close()


def test_long_clip_does_not_delay_a_batch_of_short_clips(make_service: MakeService, faster_engine: Engine,
                                                          demo_clips: list[DemoClip]):
    """Regression (#13): a long clip ran inline in a batch and stalled the short ones behind it."""
    engine = GatedEngine(faster_engine, gated=False)  # records what reached the engine, no wait
    url = make_service(service_settings(max_wait_ms=20), engine=engine)
    wait_ready(url)
    long_audio = np.concatenate([c.audio for c in demo_clips] * 2)[: 90 * 16_000]  # 90 s of speech
    assert len(long_audio) == 90 * 16_000
    short = [flac_bytes(c.audio) for c in demo_clips[:4]]
    done: dict[str, float] = {}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300) as client:
            async def post(name: str, data: bytes) -> httpx.Response:
                response = await client.post(f"{url}/transcribe", files={"file": (f"{name}.flac", data)})
                done[name] = time.monotonic()
                return response

            long_task = asyncio.create_task(post("long", flac_bytes(long_audio)))
            await wait_until_async(lambda: len(long_audio) in engine.seen, "the long clip to reach the engine")
            started = time.monotonic()
            shorts = await asyncio.gather(*(post(f"short{i}", d) for i, d in enumerate(short)))
            done["short_latency"] = time.monotonic() - started
            return [await long_task, *shorts]

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert all(r.json()["text"] for r in responses)
    assert max(done[f"short{i}"] for i in range(4)) < done["long"], done  # they did not wait for it


# --- the pipeline's client waits through 429s ---


def test_client_waits_through_429s_without_counting_failures(make_service: MakeService, service_engine: Engine,
                                                              tmp_path: Path):
    engine = GatedEngine(service_engine)
    url = make_service(service_settings(max_batch_size=1, max_queue=1, max_wait_ms=0), engine=engine)
    wait_ready(url)
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=str(tmp_path / "r"), service_url=url,
                                http_retries=0, http_concurrency=8, http_timeout_s=60)
    uploads = [silent_flac(16_000 + i) for i in range(8)]
    try:
        with ServiceClient(settings) as client, ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(client.transcribe, d, "c.flac") for d in uploads]
            # 8 clips, room for 1 in the engine + 1 queued while the gate is shut: some get 429
            wait_until(lambda: metric(url, "whisper_rejected", lane="short") >= 1, "a 429 to the client")
            engine.gate.set()
            bodies = [a.result(timeout=DEADLINE_S) for a in answers]
    finally:
        engine.gate.set()
    assert [b["text"] for b in bodies] == [""] * 8  # every clip answered, with no retry allowed
    assert sorted(engine.seen) == sorted(16_000 + i for i in range(8))


def test_client_gives_up_on_429_after_its_wait_budget(make_service: MakeService, service_engine: Engine,
                                                       tmp_path: Path):
    engine = GatedEngine(service_engine)
    url = make_service(service_settings(max_batch_size=1, max_queue=1, max_wait_ms=0), engine=engine)
    wait_ready(url)
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=str(tmp_path / "r"), service_url=url,
                                http_retries=0, http_timeout_s=1.5)
    try:
        with ThreadPoolExecutor(2) as pool:
            def post(i: int):
                return pool.submit(httpx.post, f"{url}/transcribe",
                                   files={"file": ("a.flac", silent_flac(16_000 + i))}, timeout=DEADLINE_S)

            # One after the other: sent together, the second can find the first still queued (429).
            busy = [post(0)]
            wait_until(lambda: len(engine.seen) == 1, "the first clip in the (shut) engine")
            busy.append(post(1))
            wait_until(lambda: metric(url, "whisper_queue_depth", lane="short") == 1, "the second clip queued")
            rejected = metric(url, "whisper_rejected", lane="short")
            with ServiceClient(settings) as client, pytest.raises(ServiceOverloadedError, match="429"):
                client.transcribe(silent_flac(30_000), "c.flac")
            # Counted, not timed: Retry-After is >= 1 s, so a 1.5 s budget allows 2 to 4 tries.
            assert 2 <= metric(url, "whisper_rejected", lane="short") - rejected <= 4
            engine.gate.set()
            assert [f.result(timeout=DEADLINE_S).status_code for f in busy] == [200, 200]
    finally:
        engine.gate.set()

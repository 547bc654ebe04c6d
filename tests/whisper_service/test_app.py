"""The Whisper service over real HTTP: real uvicorn, real model (tiny.en on CPU), real audio.

One engine for the module (`service_engine`, the default openai-whisper); several apps share it,
each with its own settings and metrics registry. Transcripts are compared with the engine's own
output or the references, never hard-coded, since the demo corpus may be regenerated.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import soxr
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tests.metrics import transcribe_requests
from tests.wer import normalise, wer
from tests.whisper_service.conftest import (
    DEMO_DATA,
    DemoClip,
    MakeService,
    service_settings,
    wait_ready,
)
from whisper_service.audio import decode_audio
from whisper_service.batching import Batcher
from whisper_service.engines.base import Engine, Transcript
from whisper_service.settings import WhisperServiceSettings

TIMEOUT = httpx.Timeout(120.0)
OPENAI_ROUTE = "/v1/audio/transcriptions"


def flac_bytes(audio: np.ndarray, sample_rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, sample_rate, format="FLAC")
    return buffer.getvalue()


def post_clip(url: str, data: bytes, route: str = "/transcribe", **form: str) -> httpx.Response:
    files = {"file": ("clip.flac", data)}
    return httpx.post(f"{url}{route}", files=files, data=form, timeout=TIMEOUT)


async def post_concurrently(url: str, clips: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        return await asyncio.gather(
            *(client.post(f"{url}/transcribe", files={"file": ("c.flac", c)}) for c in clips)
        )


def metric_samples(url: str, family: str, headers: dict[str, str] | None = None) -> dict:
    """{(sample name, sorted label pairs): value} for one metric family of /metrics."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(response.text)
        if f.name == family
        for s in f.samples
    }


def counter(url: str, family: str, **labels: str) -> float:
    key = (f"{family}_total", tuple(sorted(labels.items())))
    return metric_samples(url, family).get(key, 0.0)


def engine_calls(url: str) -> tuple[float, float]:
    """(engine calls, clips) so far, from the batch-size histogram."""
    sizes = metric_samples(url, "whisper_batch_size")
    return sizes[("whisper_batch_size_count", ())], sizes[("whisper_batch_size_sum", ())]


@pytest.fixture(scope="module")
def clip_bytes() -> dict[str, bytes]:
    """The demo clips as a client uploads them: each FLAC file's own bytes, by id."""
    root = DEMO_DATA / "audio"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*.flac"))}


@pytest.fixture(scope="module")
def good_clip(clip_bytes: dict[str, bytes]) -> bytes:
    return next(iter(clip_bytes.values()))


# --- loading and health ---


class BorrowedEngine:
    """The session's engine, handed to an app as if it loaded it; the app's close() leaves it open
    (closing the shared engine broke every later module of this worker that serves it)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


def test_healthz_is_503_while_loading_then_200(
    make_service: MakeService, service_engine: Engine, good_clip: bytes
) -> None:
    release = threading.Event()

    def slow_load() -> Engine:
        release.wait(30)
        return BorrowedEngine(service_engine)  # the app closes what it loaded: not the shared engine

    url = make_service(engine=None, load=slow_load)
    loading = httpx.get(f"{url}/healthz")
    assert (loading.status_code, loading.json()) == (503, {"status": "loading"})
    refused = post_clip(url, good_clip)
    assert refused.status_code == 503 and "loading" in refused.json()["error"]
    release.set()
    health = wait_ready(url).json()
    options = service_engine.options
    assert health == {
        "status": "ok", "engine": "openai-whisper", "model": "tiny.en", "device": "cpu",
        "weights_sha256": options.weights_sha256,
        "decode": options.model_dump(mode="json"),
        "fingerprint": options.fingerprint,
    }
    assert len(health["fingerprint"]) == 64 and health["decode"]["temperatures"][0] == 0.0
    assert post_clip(url, good_clip).status_code == 200


def test_failed_load_is_reported_not_hidden(make_service: MakeService, good_clip: bytes) -> None:
    url = make_service(service_settings(model="/nonexistent/model"), engine=None)
    for _ in range(200):
        health = httpx.get(f"{url}/healthz")
        if health.json()["status"] != "loading":
            break
        time.sleep(0.05)
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "not available offline" in health.json()["error"]
    assert post_clip(url, good_clip).status_code == 503


def test_auto_engine_from_settings_is_faster_whisper_on_cpu(
    make_service: MakeService, service_engine: Engine, clip_bytes: dict[str, bytes]
) -> None:
    """No engine passed: the lifespan loads `settings.engine` (default auto: faster-whisper int8
    on this CPU); batched results equal single ones."""
    url = make_service(service_settings(device="cpu"), engine=None)
    health = wait_ready(url).json()
    assert (health["engine"], health["model"], health["device"]) == ("faster-whisper", "tiny.en", "cpu")
    assert (health["decode"]["compute_type"], health["decode"]["beam_size"]) == ("int8", 5)
    # same weights (content hash) as the openai-whisper service, yet another fingerprint
    assert health["weights_sha256"] == service_engine.options.weights_sha256
    assert health["fingerprint"] != service_engine.options.fingerprint
    first = post_clip(url, next(iter(clip_bytes.values()))).json()
    assert (first["engine"], first["fingerprint"]) == ("faster-whisper", health["fingerprint"])
    clips = list(clip_bytes.values())[8:11]  # 3: if the first runs alone, two queue behind it
    sequential = [post_clip(url, c).json()["text"] for c in clips]
    calls_before, _ = engine_calls(url)
    concurrent = asyncio.run(post_concurrently(url, clips))
    assert [r.json()["text"] for r in concurrent] == sequential and all(sequential)
    assert engine_calls(url)[0] - calls_before < len(clips), "no engine call held >1 clip"
    silence = post_clip(url, flac_bytes(np.zeros(16_000, np.float32)))
    assert silence.json()["text"] == ""
    french = post_clip(url, clips[0], language="fr")  # tiny.en has no French
    assert french.status_code == 400 and "English-only" in french.json()["error"]


# --- transcription ---


def test_transcribe_demo_clip(
    service_url: str,
    service_engine: Engine,
    demo_clips: list[DemoClip],
    clip_bytes: dict[str, bytes],
) -> None:
    clip = demo_clips[0]
    before = transcribe_requests(service_url)
    response = post_clip(service_url, clip_bytes[clip.id])
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "text", "language", "duration", "model", "engine", "fingerprint", "language_probability",
        "avg_logprob", "no_speech_prob", "compression_ratio", "temperature", "words_per_second",
        "flags",
    }
    expected = service_engine.transcribe([clip.audio])[0]
    assert body["text"] == expected.text != ""
    assert (body["language"], body["model"]) == ("en", "tiny.en")
    assert (body["engine"], body["fingerprint"]) == ("openai-whisper", service_engine.options.fingerprint)
    assert body["language_probability"] is None  # tiny.en detects nothing
    assert (body["temperature"], body["flags"]) == (expected.temperature, list(expected.flags))
    assert body["avg_logprob"] == pytest.approx(expected.avg_logprob, abs=1e-3)
    assert body["compression_ratio"] == pytest.approx(expected.compression_ratio)
    assert body["words_per_second"] == pytest.approx(expected.words_per_second)
    assert body["duration"] == pytest.approx(len(clip.audio) / 16_000, abs=1e-3)
    assert transcribe_requests(service_url) == before + 1
    assert counter(service_url, "whisper_transcriptions", route="/transcribe") >= 1


@pytest.fixture(scope="module")
def corpus_concurrently(
    service_url: str, demo_clips: list[DemoClip], clip_bytes: dict[str, bytes]
) -> tuple[list[str], float]:
    """Every demo clip posted at once: (texts in demo_clips order, engine calls they took)."""
    calls_before, clips_before = engine_calls(service_url)
    responses = asyncio.run(post_concurrently(service_url, [clip_bytes[c.id] for c in demo_clips]))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    calls, clips = engine_calls(service_url)
    assert clips - clips_before == len(demo_clips)
    return [r.json()["text"] for r in responses], calls - calls_before


def test_wer_over_demo_corpus(
    demo_clips: list[DemoClip], corpus_concurrently: tuple[list[str], float]
) -> None:
    references = [c.reference for c in demo_clips]
    hypotheses, _ = corpus_concurrently
    score = wer(references, hypotheses)
    assert score <= 0.25, f"WER {score:.3f}: {list(zip(references, hypotheses))}"


def test_concurrent_requests_are_batched_and_equal_sequential(
    service_url: str,
    demo_clips: list[DemoClip],
    clip_bytes: dict[str, bytes],
    corpus_concurrently: tuple[list[str], float],
) -> None:
    batched, calls = corpus_concurrently
    assert calls < len(demo_clips), "no engine call held more than one clip"
    for i in (0, 7, 13):  # one clip per speaker folder, one at a time
        alone = post_clip(service_url, clip_bytes[demo_clips[i].id]).json()["text"]
        assert alone == batched[i], demo_clips[i].id


def test_openai_route_response_formats(service_url: str, good_clip: bytes) -> None:
    as_json = post_clip(service_url, good_clip, OPENAI_ROUTE, model="whisper-1")
    assert as_json.status_code == 200 and set(as_json.json()) == {"text"}
    text = as_json.json()["text"]
    assert text
    as_text = post_clip(
        service_url, good_clip, OPENAI_ROUTE, response_format="text", language="en"
    )
    assert as_text.headers["content-type"].startswith("text/plain") and as_text.text == text
    verbose = post_clip(
        service_url, good_clip, OPENAI_ROUTE, model="whisper-1", response_format="verbose_json",
        **{"timestamp_granularities[]": "segment"},
    ).json()
    assert (verbose["task"], verbose["language"], verbose["text"]) == ("transcribe", "en", text)
    [segment] = verbose["segments"]  # a clip under 30 s is decoded as one untimed window
    assert (segment["id"], segment["start"], segment["text"]) == (0, 0.0, text)
    assert segment["end"] == pytest.approx(verbose["duration"], abs=1e-3)
    assert segment["temperature"] == 0.0 and segment["avg_logprob"] < 0
    srt = post_clip(service_url, good_clip, OPENAI_ROUTE, response_format="srt")
    end = f"{int(segment['end'])}".rjust(2, "0")
    assert srt.status_code == 200 and srt.text.startswith(f"1\n00:00:00,000 --> 00:00:{end},")
    assert srt.text.endswith(f"\n{text}\n")
    vtt = post_clip(service_url, good_clip, OPENAI_ROUTE, response_format="vtt")
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.text.endswith(f"\n{text}\n")


def test_openai_route_honours_temperature_and_prompt(
    service_url: str, service_engine: Engine, demo_clips: list[DemoClip], clip_bytes: dict[str, bytes]
) -> None:
    clip = demo_clips[0]
    hot = post_clip(
        service_url, clip_bytes[clip.id], OPENAI_ROUTE, temperature="0.7", response_format="verbose_json"
    ).json()
    assert [s["temperature"] for s in hot["segments"]] == [0.7]  # sampled at 0.7, no ladder
    prompt = "The birch canoe."
    prompted = post_clip(service_url, clip_bytes[clip.id], OPENAI_ROUTE, prompt=prompt).json()["text"]
    options = service_engine.options.for_request(prompt=prompt)
    assert prompted == service_engine.transcribe([clip.audio], None, options)[0].text
    assert prompted != service_engine.transcribe([clip.audio])[0].text  # the prompt changed the text


@pytest.mark.parametrize(
    ("form", "says"),
    [
        ({"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "'word'"),
        ({"timestamp_granularities": "word", "response_format": "verbose_json"}, "segment timestamps only"),
        ({"timestamp_granularities[]": "segment"}, "verbose_json"),
    ],
)
def test_openai_route_refuses_what_it_cannot_do(
    service_url: str, good_clip: bytes, form: dict[str, str], says: str
) -> None:
    response = post_clip(service_url, good_clip, OPENAI_ROUTE, **form)
    assert response.status_code == 400 and says in response.json()["error"], response.text


def test_stereo_48k_upload(
    service_url: str, service_engine: Engine, demo_clips: list[DemoClip]
) -> None:
    mono_48k = soxr.resample(demo_clips[1].audio, 16_000, 48_000)
    upload = flac_bytes(np.stack([mono_48k, 0.5 * mono_48k], axis=1), 48_000)
    body = post_clip(service_url, upload).json()
    assert body["duration"] == pytest.approx(len(mono_48k) / 48_000, abs=1e-3)
    assert body["text"] == service_engine.transcribe([decode_audio(upload)])[0].text != ""


def test_silence_is_empty_text(service_url: str) -> None:
    body = post_clip(service_url, flac_bytes(np.zeros(3 * 16_000, dtype=np.float32))).json()
    assert body["text"] == "" and body["duration"] == pytest.approx(3.0)


def test_audio_over_30s_is_transcribed_whole_without_blocking(
    service_url: str, demo_clips: list[DemoClip]
) -> None:
    gap = np.zeros(8_000, dtype=np.float32)
    chosen: list[DemoClip] = []
    while sum(len(c.audio) + len(gap) for c in chosen) < 33 * 16_000:  # just over one window
        chosen.append(demo_clips[len(chosen)])
    audio = np.concatenate([part for c in chosen for part in (c.audio, gap)])
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_clip, service_url, flac_bytes(audio))
        time.sleep(0.5)  # let the engine start on it
        answered = 0  # counted, not timed: a loop blocked by the engine answers once, after it
        while answered < 3 and not pending.done():
            assert httpx.get(f"{service_url}/healthz").status_code == 200
            answered += not pending.done()
        body = pending.result().json()
    assert answered == 3, "the event loop waited for the engine"
    assert body["duration"] == pytest.approx(len(audio) / 16_000, abs=1e-3)
    words = normalise(body["text"])
    reference = [w for c in chosen for w in normalise(c.reference)]
    assert len(words) >= 0.8 * len(reference), body["text"]
    tail = set(normalise(" ".join(c.reference for c in chosen[-2:])))  # spoken after 30 s
    assert len(tail & set(words[-25:])) >= len(tail) // 2, body["text"]


# --- bad input: a 4xx saying why, and the server keeps serving ---

MULTIPART_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)
FIVE_MB = 5 * 1024 * 1024  # the test services allow 4 MiB


def bad_request(case: str, good: bytes) -> dict[str, Any]:
    """httpx.post keyword arguments for one kind of bad upload."""
    if case == "empty upload":
        return {"files": {"file": ("a.flac", b"")}}
    if case == "not audio":
        return {"files": {"file": ("a.flac", b"hello, not audio " * 64)}}
    if case == "truncated flac":
        return {"files": {"file": ("a.flac", good[: len(good) // 2])}}
    if case == "missing file field":
        return {"data": {"language": "en"}}
    if case == "a path instead of a file":
        return {"data": {"file": "/etc/passwd"}}
    if case == "over the limit":
        return {"files": {"file": ("a.flac", b"\0" * FIVE_MB)}}
    if case == "over the limit, chunked":  # no Content-Length: counted while streaming
        chunks = [MULTIPART_HEAD] + [b"x" * 1024 * 1024] * 5
        headers = {"content-type": "multipart/form-data; boundary=b"}
        return {"content": iter(chunks), "headers": headers}
    raise ValueError(case)


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("empty upload", 400, "empty upload"),
        ("not audio", 400, "not readable audio"),
        ("truncated flac", 400, "not readable audio"),
        ("missing file field", 422, "file: Field required"),
        ("a path instead of a file", 422, "file"),
        ("over the limit", 413, "limit"),
        ("over the limit, chunked", 413, "exceeds"),
    ],
)
def test_bad_input_is_refused_and_server_keeps_serving(
    service_url: str, good_clip: bytes, case: str, status: int, says: str
) -> None:
    request = bad_request(case, good_clip)
    response = httpx.post(f"{service_url}/transcribe", timeout=TIMEOUT, **request)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]
    assert post_clip(service_url, good_clip).status_code == 200


def test_openai_route_refuses_unknown_response_format(service_url: str, good_clip: bytes) -> None:
    response = post_clip(service_url, good_clip, OPENAI_ROUTE, response_format="docx")
    assert response.status_code == 422 and "response_format" in response.json()["error"]
    too_hot = post_clip(service_url, good_clip, OPENAI_ROUTE, temperature="1.5")
    assert too_hot.status_code == 422 and "temperature" in too_hot.json()["error"]


def test_errors_are_counted_by_reason(service_url: str) -> None:
    before = counter(service_url, "whisper_errors", reason="empty_upload")
    httpx.post(f"{service_url}/transcribe", files={"file": ("a.flac", b"")})
    assert counter(service_url, "whisper_errors", reason="empty_upload") == before + 1
    assert counter(service_url, "whisper_requests", route="/transcribe", status="400") >= 1


def test_requests_in_progress_counts_open_requests_and_not_its_own_scrape(
    service_url: str, demo_clips: list[DemoClip], clip_bytes: dict[str, bytes]
) -> None:
    """Operators and tests (a killed client's requests drained) read when the service is idle."""
    gauge = ("whisper_requests_in_progress", ())
    assert metric_samples(service_url, "whisper_requests_in_progress")[gauge] == 0
    seen: list[float] = []
    with ThreadPoolExecutor(4) as pool:
        posts = [pool.submit(post_clip, service_url, clip_bytes[c.id]) for c in demo_clips[:4]]
        while not all(p.done() for p in posts):
            seen.append(metric_samples(service_url, "whisper_requests_in_progress")[gauge])
            time.sleep(0.02)
    assert all(p.result().status_code == 200 for p in posts)
    assert max(seen) >= 1 and all(0 <= n <= 4 for n in seen), seen
    assert metric_samples(service_url, "whisper_requests_in_progress")[gauge] == 0


# --- security ---


def test_bearer_token(make_service: MakeService, good_clip: bytes) -> None:
    url = make_service(service_settings(api_token="s3cret-token"))
    wait_ready(url)  # /healthz stays open for probes
    upload = {"file": ("a.flac", good_clip)}
    assert httpx.get(f"{url}/metrics").status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
        response = httpx.post(f"{url}/transcribe", files=upload, headers=headers)
        assert response.status_code == 401 and "token" in response.json()["error"]
    auth = {"Authorization": "Bearer s3cret-token"}
    ok = httpx.post(f"{url}/transcribe", files=upload, headers=auth, timeout=TIMEOUT)
    assert ok.status_code == 200 and ok.json()["text"]
    errors = metric_samples(url, "whisper_errors", headers=auth)
    assert errors[("whisper_errors_total", (("reason", "unauthorized"),))] == 4


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org"])
def test_settings_refuse_public_host_without_token(host: str) -> None:
    with pytest.raises(ValidationError, match="WHISPER_API_TOKEN"):
        WhisperServiceSettings(host=host)
    assert WhisperServiceSettings(host=host, api_token="t").host == host
    assert WhisperServiceSettings(host=host, allow_public=True).host == host


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHISPER_API_TOKEN", "from-env")
    monkeypatch.setenv("WHISPER_MAX_BATCH_SIZE", "4")
    settings = WhisperServiceSettings()
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings) and settings.max_batch_size == 4
    monkeypatch.setenv("WHISPER_API_TOKEN", " ")
    with pytest.raises(ValidationError, match="empty"):
        WhisperServiceSettings()


# --- the batcher alone: a recording fake engine tests grouping and isolation, not Whisper ---


class RecordingEngine:
    name, model_name, device = "recording", "none", "cpu"

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []
        self.options_seen: list[object] = []

    def transcribe(
        self, batch: list[np.ndarray], language: str | None = None, options: object = None
    ) -> list[Transcript]:
        self.calls.append((len(batch), language))
        self.options_seen.append(options)
        if any(a[0] < 0 for a in batch):
            raise ValueError("negative first sample")
        return [Transcript(f"{a[0]:.0f}", language or "en", len(a) / 16_000) for a in batch]

    def close(self) -> None:
        pass


def test_batcher_groups_by_language_and_isolates_failures() -> None:
    engine = RecordingEngine()

    async def scenario() -> list[Transcript | BaseException]:
        batcher = Batcher(engine, max_batch_size=8, max_wait_ms=50)
        batcher.start()
        requests = [(1, "en"), (2, "fr"), (-3, "en"), (4, "en"), (5, "fr")]
        results = await asyncio.gather(
            *(batcher.transcribe(np.full(160, v, np.float32), lang) for v, lang in requests),
            return_exceptions=True,
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    texts = [r.text if isinstance(r, Transcript) else type(r).__name__ for r in results]
    assert texts == ["1", "2", "ValueError", "4", "5"]
    assert [r.language for r in results if isinstance(r, Transcript)] == ["en", "fr", "en", "fr"]
    # one call per language; the failed "en" batch is retried clip by clip
    assert engine.calls == [(3, "en"), (1, "en"), (1, "en"), (1, "en"), (2, "fr")]


def test_batcher_groups_by_decode_options() -> None:
    """Requests with other decode options (an OpenAI temperature) never share an engine call."""
    from tests.whisper_service.test_decode_options import build

    engine = RecordingEngine()
    hot = build().for_request(temperature=0.7)

    async def scenario() -> None:
        batcher = Batcher(engine, max_batch_size=8, max_wait_ms=50)
        batcher.start()
        await asyncio.gather(
            *(batcher.transcribe(np.full(160, i, np.float32), "en", o)
              for i, o in enumerate([None, hot, None, hot, None]))
        )
        await batcher.stop()

    asyncio.run(scenario())
    assert engine.calls == [(3, "en"), (2, "en")]
    assert engine.options_seen == [None, hot]

"""The service as deployed: a real `audio-pipeline serve` subprocess configured from WHISPER_* env.

Adds what tests/whisper_service/test_app.py does not cover: the token on *every* route (docs,
OpenAPI, the OpenAI route, unknown paths), format sniffing in both directions, no path taken from
any part of a request, env-configured limits, and a bounded load run (bench/service_load.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf

from bench.service_load import run_load, verdict
from tests.reliability.conftest import AUTH, TOKEN, ServiceProcess
from tests.reliability.conftest import UPLOAD_LIMIT as LIMIT
from tests.reliability.corpus import GOOD, absurd_rate_wav, channel_bomb_flac, header_only_flac, unknown_length_flac
from whisper_service.app import OPEN_PATHS, create_app
from whisper_service.settings import WhisperServiceSettings

TIMEOUT = 120

pytestmark = pytest.mark.slow


@pytest.fixture
def service(token_service) -> ServiceProcess:
    """The session's service started with WHISPER_API_TOKEN and WHISPER_MAX_UPLOAD_BYTES=1 MiB."""
    return token_service


def post(url: str, route: str = "/transcribe", headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{route}", headers=AUTH if headers is None else headers, timeout=TIMEOUT, **kwargs)


def transcriptions(url: str) -> int:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("whisper_transcriptions_total{")))


def encode(audio: np.ndarray, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16_000, format=fmt, subtype=subtype)
    return buffer.getvalue()


# --- bearer token on every route but /healthz ---


def test_token_is_required_on_every_route_but_healthz(service):
    app = create_app(WhisperServiceSettings(api_token=TOKEN))  # the served app's routes (nothing loads)
    routes = [(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops]
    routes += [("GET", route.path) for route in app.routes if getattr(route, "path", None)]  # docs, schema
    assert ("POST", "/v1/audio/transcriptions") in routes and ("GET", "/openapi.json") in routes
    routes += [("GET", "/no-such-route"), ("POST", "/no-such-route"), ("DELETE", "/transcribe")]
    for method, path in routes:
        if path in OPEN_PATHS:
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer"}):
            response = httpx.request(method, f"{service.url}{path}", headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert TOKEN not in response.text
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{service.url}{path}", headers=AUTH).status_code == 200, path


# --- content is sniffed from the bytes, never trusted from the name or Content-Type ---


def test_format_comes_from_the_bytes_not_the_name_or_content_type(service):
    audio, _ = sf.read(GOOD[3], dtype="float32")
    flac = GOOD[3].read_bytes()
    reference = post(service.url, files={"file": ("a.flac", flac, "audio/flac")})
    assert reference.status_code == 200 and reference.json()["text"]
    disguised = [
        ("wav named .flac", ("x.flac", encode(audio, "WAV", "PCM_16"), "audio/flac")),
        ("flac named .wav", ("x.wav", flac, "audio/wav")),
        ("wav, no name", ("blob", encode(audio, "WAV", "PCM_16"), "application/octet-stream")),
    ]
    for case, upload in disguised:
        response = post(service.url, files={"file": upload})
        assert response.status_code == 200, (case, response.text)
        assert response.json()["text"] == reference.json()["text"], case
    ogg = post(service.url, files={"file": ("x.mp3", encode(audio, "OGG", "VORBIS"), "audio/mpeg")})
    assert ogg.status_code == 200 and ogg.json()["text"], ogg.text
    for case, upload in [
        ("random bytes named .wav", ("x.wav", np.random.default_rng(1).bytes(4096), "audio/wav")),
        ("text named .flac", ("x.flac", b"hello " * 500, "audio/flac")),
        ("flac magic, then junk", ("x.flac", b"fLaC" + bytes(2000), "audio/flac")),
    ]:
        response = post(service.url, files={"file": upload})
        assert response.status_code == 400 and "not readable audio" in response.json()["error"], (case, response.text)


def test_flac_of_unknown_length_is_decoded_or_refused_with_a_4xx(service):
    """Regression: total_samples=0 in STREAMINFO made numpy raise "array is too big": a 500,
    which the pipeline retried three times. Frames present: transcribed; none: a 400."""
    empty = post(service.url, files={"file": ("zero.flac", header_only_flac(), "audio/flac")})
    assert empty.status_code == 400 and "no samples" in empty.json()["error"], empty.text
    streamed = post(service.url, files={"file": ("s.flac", unknown_length_flac(), "audio/flac")})
    known = post(service.url, files={"file": ("k.flac", GOOD[0].read_bytes(), "audio/flac")})
    assert streamed.status_code == 200 and known.status_code == 200, (streamed.text, known.text)
    assert streamed.json()["text"] == known.json()["text"] != ""


# --- decoding bounded by samples (#13) ---


def peak_rss_rise_mib(pid: int, action) -> float:
    """How far `pid`'s peak RSS (VmHWM, reset via /proc/<pid>/clear_refs) rose above its RSS
    before `action()`. A sampled RSS could miss a transient array; the kernel's peak cannot."""
    proc = Path(f"/proc/{pid}")
    try:
        (proc / "clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the service's peak RSS (/proc/<pid>/clear_refs not writable)")
    before = psutil.Process(pid).memory_info().rss
    action()
    hwm = next(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    return (hwm * 1024 - before) / (1024 * 1024)


def test_channel_bomb_costs_bounded_memory_and_absurd_rate_is_a_400(service):
    """Regression: a 91 KiB FLAC of 60 s 192 kHz 8-channel silence raised the service's memory by
    440 MiB; a WAV saying 2^31-1 Hz answered 200 with an empty text."""
    rate = post(service.url, files={"file": ("r.wav", absurd_rate_wav(), "audio/wav")})
    assert rate.status_code == 400 and "sample rate 2147483647 Hz" in rate.json()["error"], rate.text
    bomb = channel_bomb_flac()
    assert len(bomb) < 120 * 1024
    responses = []
    rise = peak_rss_rise_mib(service.pid, lambda: responses.append(
        post(service.url, files={"file": ("b.flac", bomb, "audio/flac")})))
    assert responses[0].status_code == 200 and responses[0].json()["text"] == "", responses[0].text
    assert rise < 64, f"service peak RSS rose {rise:.0f} MiB for a 91 KiB upload"


# --- no filesystem path is ever taken from a request ---


def test_no_path_is_read_from_any_part_of_a_request(service):
    real_clip = str(GOOD[0])  # a readable audio file on the server's disk
    before = transcriptions(service.url)
    for route in ("/transcribe", "/v1/audio/transcriptions"):
        as_field = post(service.url, route, data={"file": real_clip, "model": "whisper-1"})
        assert as_field.status_code == 422, as_field.text
        as_query = post(service.url, f"{route}?file={real_clip}", data={"model": "whisper-1"})
        assert as_query.status_code == 422, as_query.text
        as_json = post(service.url, route, json={"file": real_clip})
        assert as_json.status_code == 422, as_json.text
        # a path as the upload's *name*: the (empty or junk) bytes are what counts
        for name in (real_clip, "../../../../" + real_clip.lstrip("/"), "/etc/passwd"):
            empty = post(service.url, route, files={"file": (name, b"")}, data={"model": "whisper-1"})
            assert empty.status_code == 400 and "empty upload" in empty.json()["error"], (route, name, empty.text)
            junk = post(service.url, route, files={"file": (name, b"junk" * 100)}, data={"model": "whisper-1"})
            assert junk.status_code == 400, (route, name, junk.text)
    assert transcriptions(service.url) == before  # nothing was transcribed from a path


# --- limits configured through the environment of the served process ---


def test_upload_limit_from_env_is_enforced(service):
    over = post(service.url, files={"file": ("big.flac", b"\0" * (LIMIT + 65 * 1024 + 1))})
    assert over.status_code == 413, over.text
    under = post(service.url, files={"file": ("big.flac", b"\0" * (LIMIT - 1024))})
    assert under.status_code == 400 and "not readable audio" in under.json()["error"]  # read, then refused
    assert httpx.get(f"{service.url}/healthz").status_code == 200


# --- bounded load, good and bad requests mixed ---


def test_service_under_mixed_load_has_no_5xx_and_bounded_memory(service):
    before = transcriptions(service.url)
    report = run_load(service.url, TOKEN, clients=8, requests=60, max_seconds=150, pid=service.pid,
                      max_upload_bytes=LIMIT)
    assert report["not_sent"] == 0, report
    assert verdict(report, rss_bound_mb=200) == [], report
    assert report["status_5xx"] == 0 and report["unexpected_count"] == 0
    assert report["latency_ms"]["p99"] is not None and report["rss_mb"]["growth"] is not None
    assert transcriptions(service.url) > before
    assert httpx.get(f"{service.url}/healthz").status_code == 200  # still serving


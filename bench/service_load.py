"""Load and abuse the Whisper service on loopback: concurrent clients, good and bad requests mixed.

Not a test (tests/reliability/test_service_security.py runs a small variant). It checks that under
load every request gets the status its kind deserves (200 for audio, 4xx for bad input, 401 without
the token), that nothing answers 5xx, and that the service's resident memory stays bounded.

    uv run python bench/service_load.py                      # starts its own service, 32 x 300
    uv run python bench/service_load.py --url http://127.0.0.1:8000 --token T --pid 1234
    uv run python bench/service_load.py --overload           # the 429 path: bench/results/service_overload-cpu.json

Starts the service itself (`audio-pipeline serve` on 127.0.0.1, a free port, a random token, a
1 MiB upload limit) unless --url is given. Bounded: at most --requests requests, none started after
--max-seconds. Prints JSON and writes bench/out/service_load.json; exits 1 if any request got a
5xx or an unexpected status, or RSS grew by more than --rss-bound-mb.

`--overload` shows backpressure instead: a service with a small queue (WHISPER_MAX_QUEUE) gets
far more concurrent clips than it can hold. Phase 1 (baseline): as many clients as one batch.
Phase 2 (overload): --clients raw clients, no retries: every answer must be 200 or 429 with
Retry-After, never 5xx, and RSS stays bounded. Phase 3: the pipeline's own `ServiceClient` (honours
429) sends the same clips with http_retries=0: every clip must be transcribed. Prints throughput
ratios against the baseline and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

from flows.demo import service_process

REPO = Path(__file__).parents[1]
DEMO_AUDIO = REPO / "flows" / "demo_data" / "audio"
OUT = Path(__file__).parent / "out" / "service_load.json"
OVERLOAD_OUT = Path(__file__).parent / "results" / "service_overload-cpu.json"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Kind:
    """One kind of request: how to build it and which status it must get."""

    name: str
    expected: int
    weight: int


# Weights: about half the traffic is real audio, the rest is every kind of bad request.
KINDS = (
    Kind("flac", 200, 8),
    Kind("wav_named_flac", 200, 3),  # the bytes decide the format, not the name or content type
    Kind("openai_route", 200, 2),
    Kind("empty", 400, 2),
    Kind("random_bytes_wav", 400, 2),
    Kind("truncated_flac", 400, 2),
    Kind("path_as_text", 422, 2),  # a form field naming a real audio file on the server
    Kind("no_token", 401, 2),
    Kind("wrong_token", 401, 1),
    Kind("oversize", 413, 1),
    Kind("healthz", 200, 1),
)


def _wav(path: Path) -> bytes:
    audio, rate = sf.read(path, dtype="float32")
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class Payloads:
    """Request bodies, built once from the demo clips (short speech, 2-5 s)."""

    def __init__(self, max_upload_bytes: int | None) -> None:
        clips = sorted(DEMO_AUDIO.rglob("*.flac"))
        self.flac = [p.read_bytes() for p in clips]
        self.wav = [_wav(p) for p in clips[:4]]
        self.real_path = str(clips[0])
        self.random = np.random.default_rng(0).bytes(16_384)
        self.oversize = b"\0" * (max_upload_bytes + MIB) if max_upload_bytes else None

    def kinds(self) -> list[Kind]:
        return [k for k in KINDS if k.name != "oversize" or self.oversize is not None]

    def request(self, kind: str, i: int, token: str | None) -> dict:
        """httpx `request` keyword arguments for request number `i` of `kind`."""
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        flac = self.flac[i % len(self.flac)]
        post = {"method": "POST", "url": "/transcribe", "headers": auth}
        if kind == "flac":
            return post | {"files": {"file": ("clip.flac", flac, "audio/flac")}}
        if kind == "wav_named_flac":
            return post | {"files": {"file": ("x.flac", self.wav[i % len(self.wav)], "audio/flac")}}
        if kind == "openai_route":
            return post | {"url": "/v1/audio/transcriptions", "files": {"file": ("a.flac", flac)},
                           "data": {"model": "whisper-1"}}
        if kind == "empty":
            return post | {"files": {"file": ("a.flac", b"", "audio/flac")}}
        if kind == "random_bytes_wav":
            return post | {"files": {"file": ("x.wav", self.random, "audio/wav")}}
        if kind == "truncated_flac":
            return post | {"files": {"file": ("t.flac", flac[: len(flac) // 2], "audio/flac")}}
        if kind == "path_as_text":
            return post | {"data": {"file": self.real_path}}
        if kind == "no_token":
            return post | {"headers": {}, "files": {"file": ("clip.flac", flac)}}
        if kind == "wrong_token":
            return post | {"headers": {"Authorization": "Bearer wrong"}, "files": {"file": ("clip.flac", flac)}}
        if kind == "oversize":
            return post | {"files": {"file": ("big.flac", self.oversize)}}
        if kind == "healthz":
            return {"method": "GET", "url": "/healthz"}
        raise ValueError(kind)


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` from /proc (no psutil needed); None if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples a process's RSS every `interval_s` in a thread; keeps the peak."""

    def __init__(self, pid: int | None, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid) or 0.0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _fire(url: str, plan: list[tuple[str, int]], payloads: Payloads, token: str, clients: int,
                deadline: float, timeout_s: float) -> list[dict]:
    results: list[dict] = []
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                kind, i = queue.get_nowait()
                if time.monotonic() > deadline:
                    results.append({"kind": kind, "status": None, "error": "not sent: time budget spent"})
                    continue
                started = time.perf_counter()
                try:
                    response = await client.request(**payloads.request(kind, i, token))
                    status, error = response.status_code, None
                    if status >= 400 and "error" not in response.json():
                        error = f"error body without 'error': {response.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:
                    status, error = None, f"{type(e).__name__}: {e}"
                results.append({"kind": kind, "status": status, "error": error,
                                "latency_s": time.perf_counter() - started})

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def run_load(url: str, token: str, *, clients: int = 32, requests: int = 300, max_seconds: float = 240,
             pid: int | None = None, max_upload_bytes: int | None = None, seed: int = 0,
             timeout_s: float = 120) -> dict:
    """Send `requests` mixed requests from `clients` concurrent clients; return the report dict."""
    payloads = Payloads(max_upload_bytes)
    kinds = payloads.kinds()
    rng = random.Random(seed)
    names = rng.choices([k.name for k in kinds], weights=[k.weight for k in kinds], k=requests)
    for k in kinds:  # every kind at least once
        names[rng.randrange(requests)] = k.name
    plan = [(name, i) for i, name in enumerate(names)]
    expected = {k.name: k.expected for k in kinds}

    # Warm-up outside the measurement: one full batch of audio, so model buffers already exist.
    warm = [("flac", i) for i in range(8)]
    asyncio.run(_fire(url, warm, payloads, token, 8, time.monotonic() + max_seconds, timeout_s))
    rss_before = rss_mb(pid) if pid else None
    started = time.monotonic()
    with RssSampler(pid) as sampler:
        results = asyncio.run(_fire(url, plan, payloads, token, clients, started + max_seconds, timeout_s))
    wall = time.monotonic() - started
    rss_after = rss_mb(pid) if pid else None

    sent = [r for r in results if r["status"] is not None or "not sent" not in (r["error"] or "")]
    latencies = [r["latency_s"] for r in sent if r.get("latency_s") is not None]
    good = [r["latency_s"] for r in sent if expected[r["kind"]] == 200 and r["status"] == 200]
    unexpected = [r for r in sent if r["status"] != expected[r["kind"]] or r["error"]]
    by_kind = {}
    for k in kinds:
        mine = [r for r in sent if r["kind"] == k.name]
        by_kind[k.name] = {
            "expected": k.expected, "sent": len(mine),
            "statuses": dict(Counter(str(r["status"]) for r in mine)),
            "p50_ms": _ms(percentile([r["latency_s"] for r in mine if "latency_s" in r], 50)),
        }
    return {
        "url": url, "clients": clients, "requests": requests, "sent": len(sent),
        "not_sent": len(results) - len(sent), "wall_s": round(wall, 2),
        "requests_per_s": round(len(sent) / wall, 2) if wall else None,
        "latency_ms": {"p50": _ms(percentile(latencies, 50)), "p99": _ms(percentile(latencies, 99)),
                       "max": _ms(max(latencies, default=None))},
        "audio_latency_ms": {"p50": _ms(percentile(good, 50)), "p99": _ms(percentile(good, 99))},
        "status_counts": dict(sorted(Counter(str(r["status"]) for r in sent).items())),
        "status_5xx": sum(1 for r in sent if r["status"] is not None and r["status"] >= 500),
        "unexpected": unexpected[:20], "unexpected_count": len(unexpected),
        "by_kind": by_kind,
        "rss_mb": {"pid": pid, "before": _round(rss_before), "after": _round(rss_after),
                   "peak": _round(sampler.peak or None),
                   "growth": _round(rss_after - rss_before) if rss_before and rss_after else None},
    }


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


@contextlib.contextmanager
def local_service(token: str, max_upload_bytes: int, timeout_s: float = 240,
                  log: Path | None = None, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """`audio-pipeline serve` on 127.0.0.1 with a token and an upload limit; yields (url, pid)."""
    env = {"WHISPER_API_TOKEN": token, "WHISPER_MAX_UPLOAD_BYTES": str(max_upload_bytes), **(extra_env or {})}
    with service_process(env=env, log=log, timeout_s=timeout_s) as service:
        yield service.url, service.pid


async def _fire_audio(url: str, clips: list[bytes], token: str, clients: int, timeout_s: float) -> list[dict]:
    """Each clip once, from `clients` concurrent raw clients, no retries: status and Retry-After."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for clip in clips:
        queue.put_nowait(clip)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            while not queue.empty():
                clip = queue.get_nowait()
                started = time.perf_counter()
                try:
                    r = await client.post("/transcribe", files={"file": ("c.flac", clip, "audio/flac")})
                    results.append({"status": r.status_code, "retry_after": r.headers.get("Retry-After"),
                                    "latency_s": time.perf_counter() - started})
                except httpx.HTTPError as e:
                    results.append({"status": None, "error": f"{type(e).__name__}: {e}"})

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def _metric_total(url: str, token: str, family: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
    return sum(sample.value for fam in text_string_to_metric_families(text) if fam.name == family
               for sample in fam.samples if sample.name.endswith("_total"))


def run_overload(url: str, token: str, *, clients: int = 32, requests: int = 64, batch_size: int = 8,
                 pid: int | None = None, timeout_s: float = 300, client_wait_s: float = 900) -> dict:
    """Baseline (one batch of clients), raw overload (no retries), then the honouring client.

    The honouring client may wait `client_wait_s` per clip in all (its http_timeout_s): with
    `clients` far above the queue, the last clips wait about requests / throughput seconds.
    """
    import tempfile

    from tasks.settings import PipelineSettings
    from tasks.transcribe import ServiceClient

    flacs = Payloads(None).flac
    clips = [flacs[i % len(flacs)] for i in range(requests)]
    asyncio.run(_fire_audio(url, clips[:batch_size], token, batch_size, timeout_s))  # warm-up

    def phase(n_clients: int) -> dict:
        rss_before = rss_mb(pid) if pid else None
        started = time.monotonic()
        with RssSampler(pid) as sampler:
            results = asyncio.run(_fire_audio(url, clips, token, n_clients, timeout_s))
        wall = time.monotonic() - started
        ok = [r for r in results if r["status"] == 200]
        statuses = Counter(str(r["status"]) for r in results)
        retry_after = sorted({int(r["retry_after"]) for r in results if r["status"] == 429 and r["retry_after"]})
        return {
            "clients": n_clients, "sent": len(results), "wall_s": round(wall, 2),
            "status_counts": dict(sorted(statuses.items())),
            "status_5xx": sum(1 for r in results if r["status"] is not None and r["status"] >= 500),
            "transport_errors": sum(1 for r in results if r["status"] is None),
            "rejected_without_retry_after": sum(1 for r in results if r["status"] == 429 and not r["retry_after"]),
            "retry_after_s": retry_after,
            "transcribed_per_s": round(len(ok) / wall, 2) if wall else None,
            "accepted_latency_ms": {"p50": _ms(percentile([r["latency_s"] for r in ok], 50)),
                                    "p99": _ms(percentile([r["latency_s"] for r in ok], 99))},
            "rss_mb": {"before": _round(rss_before), "peak": _round(sampler.peak or None),
                       "growth_to_peak": _round(sampler.peak - rss_before) if rss_before and sampler.peak else None},
        }

    baseline = phase(batch_size)
    overload = phase(clients)
    rejected_before = _metric_total(url, token, "whisper_rejected")
    with tempfile.TemporaryDirectory() as tmp:
        settings = PipelineSettings(audio_root=tmp, results_root=tmp, service_url=url, service_token=token,
                                    http_retries=0, http_concurrency=clients, http_timeout_s=client_wait_s)
        failures: list[str] = []
        started = time.monotonic()
        with ServiceClient(settings) as client, ThreadPoolExecutor(clients) as pool:
            def one(clip: bytes) -> None:
                try:
                    client.transcribe(clip, "c.flac")
                except Exception as e:  # counted, not raised: the report says how many
                    failures.append(f"{type(e).__name__}: {e}")
            list(pool.map(one, clips))
        client_wall = time.monotonic() - started
    honouring = {
        "clients": clients, "sent": len(clips), "failed": len(failures), "failures": failures[:5],
        "wall_s": round(client_wall, 2), "transcribed_per_s": round((len(clips) - len(failures)) / client_wall, 2),
        "429s_waited_through": int(_metric_total(url, token, "whisper_rejected") - rejected_before),
    }
    base_rate = baseline["transcribed_per_s"] or 0
    return {
        "url": url, "requests": requests, "batch_size": batch_size,
        "baseline": baseline, "overload": overload, "honouring_client": honouring,
        "ratios_vs_baseline": {
            "overload_throughput": round(overload["transcribed_per_s"] / base_rate, 2) if base_rate else None,
            "honouring_client_throughput": round(honouring["transcribed_per_s"] / base_rate, 2) if base_rate else None,
        },
    }


def overload_verdict(report: dict, rss_bound_mb: float) -> list[str]:
    problems = []
    over, honour = report["overload"], report["honouring_client"]
    if over["status_5xx"] or report["baseline"]["status_5xx"]:
        problems.append("some responses were 5xx")
    if over["transport_errors"]:
        problems.append(f"{over['transport_errors']} requests got no answer")
    if set(over["status_counts"]) - {"200", "429"}:
        problems.append(f"unexpected statuses under overload: {over['status_counts']}")
    if "429" not in over["status_counts"]:
        problems.append("no 429 under overload: the queue bound was never reached")
    if over["rejected_without_retry_after"]:
        problems.append("a 429 came without Retry-After")
    if honour["failed"]:
        problems.append(f"the honouring client failed {honour['failed']} clips")
    growth = over["rss_mb"]["growth_to_peak"]
    if growth is not None and growth > rss_bound_mb:
        problems.append(f"service RSS grew {growth:.0f} MiB under overload (bound {rss_bound_mb:.0f} MiB)")
    return problems


def verdict(report: dict, rss_bound_mb: float) -> list[str]:
    problems = []
    if report["status_5xx"]:
        problems.append(f"{report['status_5xx']} responses were 5xx")
    if report["unexpected_count"]:
        problems.append(f"{report['unexpected_count']} requests got an unexpected status or body")
    growth = report["rss_mb"]["growth"]
    if growth is not None and growth > rss_bound_mb:
        problems.append(f"service RSS grew {growth:.0f} MiB (bound {rss_bound_mb:.0f} MiB)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running service (default: start one on loopback)")
    parser.add_argument("--token", help="its bearer token (with --url)")
    parser.add_argument("--pid", type=int, help="its process id, to measure RSS (with --url)")
    parser.add_argument("--max-upload-bytes", type=int, default=MIB, help="upload limit (sent as oversize + 1 MiB)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=300, help="no request starts after this")
    parser.add_argument("--rss-bound-mb", type=float, default=300, help="allowed RSS growth of the service")
    parser.add_argument("--overload", action="store_true", help="show the 429 path (see the module docstring)")
    parser.add_argument("--max-queue", type=int, default=8, help="WHISPER_MAX_QUEUE of the started service (--overload)")
    args = parser.parse_args(argv)
    if args.overload:
        return overload_main(args)

    if args.url:
        service = contextlib.nullcontext((args.url, args.pid))
        token = args.token or ""
    else:
        token = secrets.token_urlsafe(24)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        service = local_service(token, args.max_upload_bytes, log=OUT.parent / "service_load.service.log")
    with service as (url, pid):
        report = run_load(url, token, clients=args.clients, requests=args.requests, max_seconds=args.max_seconds,
                          pid=pid, max_upload_bytes=args.max_upload_bytes)
    report["rss_bound_mb"] = args.rss_bound_mb
    report["problems"] = verdict(report, args.rss_bound_mb)
    report["ok"] = not report["problems"]
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    text = json.dumps(report, indent=2)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")
    return 0 if report["ok"] else 1


def overload_main(args: argparse.Namespace) -> int:
    if args.url:
        service = contextlib.nullcontext((args.url, args.pid))
        token = args.token or ""
    else:
        token = secrets.token_urlsafe(24)
        OVERLOAD_OUT.parent.mkdir(parents=True, exist_ok=True)
        service = local_service(token, args.max_upload_bytes, log=OUT.parent / "service_overload.service.log",
                                extra_env={"WHISPER_MAX_QUEUE": str(args.max_queue)})
    (OUT.parent).mkdir(parents=True, exist_ok=True)
    clients = args.clients
    requests = args.requests if args.requests != 300 else 64
    with service as (url, pid):
        report = run_overload(url, token, clients=clients, requests=requests, pid=pid)
    report["max_queue"] = args.max_queue if not args.url else None
    report["rss_bound_mb"] = args.rss_bound_mb
    report["problems"] = overload_verdict(report, args.rss_bound_mb)
    report["ok"] = not report["problems"]
    report["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    text = json.dumps(report, indent=2)
    print(text)
    r = report["ratios_vs_baseline"]
    print(f"overload/baseline throughput {r['overload_throughput']}, honouring-client/baseline "
          f"{r['honouring_client_throughput']}; 429s {report['overload']['status_counts'].get('429', 0)}, "
          f"5xx {report['overload']['status_5xx']}", file=sys.stderr)
    OVERLOAD_OUT.parent.mkdir(parents=True, exist_ok=True)
    OVERLOAD_OUT.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

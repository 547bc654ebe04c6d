"""Benchmark the Whisper service against its own engine (not a test).

(a) the engine called in-process on batches of `--batch-size` clips;
(b) the service with batching off (max batch size 1), `--clients` concurrent clients;
(c) the service with cross-request batching, same clients.
Reports audio seconds per wall second (RTFx) for each and the ratios; writes
bench/results/service-<device>.json. Goal on a 2-core CPU: (c) >= 0.9 x (a).

    uv run python bench/service.py --clients 8 --rounds 2
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.common import DEMO_AUDIO, machine, write_json  # noqa: E402


def load_clips(rounds: int) -> list[tuple[str, bytes]]:
    clips = [(p.name, p.read_bytes()) for p in sorted(DEMO_AUDIO.rglob("*.flac"))]
    return clips * rounds


def audio_seconds(clips: list[tuple[str, bytes]]) -> float:
    import io

    import soundfile as sf

    return sum(sf.info(io.BytesIO(data)).duration for _, data in clips)


def in_process(clips, batch_size: int, engine_name: str, device: str) -> float:
    from whisper_service.audio import decode_audio
    from whisper_service.engines import load_engine

    engine = load_engine(engine_name, "tiny.en", device)
    engine.transcribe([decode_audio(clips[0][1])])  # warm-up, as the service has had one
    started = time.perf_counter()
    for start in range(0, len(clips), batch_size):
        engine.transcribe([decode_audio(data) for _, data in clips[start : start + batch_size]])
    seconds = time.perf_counter() - started
    engine.close()
    return seconds


def over_http(clips, url: str, clients: int) -> float:
    with httpx.Client(base_url=url, timeout=600) as client:
        client.post("/transcribe", files={"file": clips[0]}).raise_for_status()  # warm-up

        def one(clip):
            response = client.post("/transcribe", files={"file": clip})
            response.raise_for_status()

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, clips))
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="times through the 20 demo clips")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engine", default="openai-whisper")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from flows.demo import local_service

    clips = load_clips(args.rounds)
    total_audio = audio_seconds(clips)
    common = ("--engine", args.engine, "--device", args.device)
    figures = {"engine_in_process": in_process(clips, args.batch_size, args.engine, args.device)}
    with local_service(extra_args=(*common, "--max-batch-size", "1")) as url:
        figures["service_unbatched"] = over_http(clips, url, args.clients)
    batched = ("--max-batch-size", str(args.batch_size), "--max-wait-ms", "20")
    with local_service(extra_args=(*common, *batched)) as url:
        figures["service_batched"] = over_http(clips, url, args.clients)
    rtfx = {k: total_audio / v for k, v in figures.items()}
    write_json("service", {
        "benchmark": "service", "engine": args.engine, "clips": len(clips), "audio_seconds": total_audio,
        "clients": args.clients, "batch_size": args.batch_size, "machine": machine(),
        "wall_seconds": figures, "rtfx": rtfx,
        "ratios": {
            "batched_over_in_process": rtfx["service_batched"] / rtfx["engine_in_process"],
            "batched_over_unbatched": rtfx["service_batched"] / rtfx["service_unbatched"],
        },
        "goals": {"batched_over_in_process": 0.9},
    })


if __name__ == "__main__":
    main()

"""GPU benchmark (not a test): service RTFx at batch 1/8/32/64, tokeniser alone, full flow.

Run on a machine with an NVIDIA GPU:  uv run python bench/gpu.py --files 1000
Writes bench/results/gpu-<gpu-name>.json. Anchors (issue #7): HF Open ASR leaderboard tiny.en
RTFx ~348 on an A100 at batch 64; goals: service RTFx >= 300 on an H100, flow >= 0.8x service.
`--allow-cpu` runs the same code on a CPU (small sizes) so the script itself stays tested.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.common import machine, make_corpus, setup_prefect_env, write_json  # noqa: E402
from bench.pipeline import run_flow  # noqa: E402
from bench.service import over_http  # noqa: E402


def tokeniser_rtfx(audio_dir: Path, device: str) -> float:
    import soundfile as sf

    from tasks.tokenisers import get_tokeniser

    arrays = [sf.read(p, dtype="float32")[0] for p in sorted(audio_dir.rglob("*.flac"))]
    tokeniser = get_tokeniser("rpq", device=device)
    tokeniser.tokenise(arrays[:8])  # warm-up (kernels, codebook upload)
    started = time.perf_counter()
    for start in range(0, len(arrays), 64):
        tokeniser.tokenise(arrays[start : start + 64])
    return sum(len(a) for a in arrays) / 16000 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--allow-cpu", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("no CUDA device: run on a GPU machine, or pass --allow-cpu for a smoke run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup_prefect_env()
    from flows.demo import local_service

    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio"
        total_audio = make_corpus(audio, args.files)
        clips = [(p.name, p.read_bytes()) for p in sorted(audio.rglob("*.flac"))]
        service: dict[str, float] = {}
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            extra = ("--device", device, "--max-batch-size", str(batch), "--max-wait-ms", "10")
            with local_service(extra_args=extra) as url:
                service[str(batch)] = total_audio / over_http(clips, url, clients=max(4, 2 * batch))
        best = max(service, key=service.get)
        extra = ("--device", device, "--max-batch-size", best, "--max-wait-ms", "10")
        with local_service(extra_args=extra) as url:
            started = time.perf_counter()
            run_flow(audio, Path(tmp) / "results", url, batch_size=64)
            flow_rtfx = total_audio / (time.perf_counter() - started)
        payload = {
            "benchmark": "gpu", "files": args.files, "audio_seconds": total_audio, "machine": machine(),
            "service_rtfx_by_batch": service, "tokeniser_rtfx": tokeniser_rtfx(audio, device),
            "flow_rtfx": flow_rtfx,
            "ratios": {"flow_over_best_service": flow_rtfx / service[best]},
            "goals": {"service_rtfx_h100": 300, "flow_over_best_service": 0.8},
        }
    write_json("gpu", payload)


if __name__ == "__main__":
    main()

"""Shared benchmark helpers: perturbed copies of the demo clips, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import soundfile as sf

DEMO_AUDIO = Path(__file__).parents[1] / "flows" / "demo_data" / "audio"
RESULTS_DIR = Path(__file__).parent / "results"


def make_corpus(root: Path, n: int, seed: int = 0) -> float:
    """Write `n` distinct clips (demo clips with random gain and faint noise) in VCTK layout.

    Returns the total audio seconds. Speakers get 100 clips each, like a small VCTK folder.
    """
    rng = np.random.default_rng(seed)
    sources = sorted(DEMO_AUDIO.rglob("*.flac"))
    clips = [sf.read(p, dtype="float32") for p in sources]
    total = 0.0
    for i in range(n):
        audio, rate = clips[i % len(clips)]
        perturbed = np.clip(audio * rng.uniform(0.6, 1.2) + rng.normal(0, 1e-3, audio.shape), -1, 1)
        speaker = f"b{i // 100:03d}"
        path = root / speaker / f"{speaker}_{i:05d}_mic1.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, perturbed.astype(np.float32), rate, subtype="PCM_16")
        total += len(audio) / rate
    return total


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = payload.get("machine", {}).get("gpu", "cpu").lower().replace(" ", "-")
    path = RESULTS_DIR / f"{name}-{tag}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def setup_prefect_env() -> None:
    """Same environment as the CLI: ephemeral Prefect API, quiet Dask, no analytics."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

"""Peak memory of decoding one upload: the old whole-file path against the block path, same run.

Not a test (tests/whisper_service/test_audio_bounds.py asserts a bound on the block path). The
input is the channel bomb of tests/reliability/corpus.py: 60 s of 192 kHz 8-channel FLAC silence,
~91 KiB that holds 92 M samples (350 MiB as float32).

- `whole`: what whisper_service.audio did before block decoding: soundfile reads the whole file
  as float32, then downmix, then resample (soxr) to 16 kHz mono.
- `blocks`: `whisper_service.audio.decode_audio` now: blocks of 2^19 samples, each downmixed and
  resampled as it arrives.

Each measurement runs in a fresh interpreter (so one path's freed memory cannot serve the other)
and reads the process's peak RSS (VmHWM, reset via /proc/self/clear_refs just before decoding).
Linux only. Prints JSON and writes bench/results/decode_memory-<machine>.json.

    uv run python bench/decode_memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
MIB = 1024 * 1024


def measure(path: str) -> dict:
    """In this process: decode the bomb by `path`; RSS rise to the peak, in MiB."""
    import numpy as np
    import psutil
    import soundfile as sf

    from tests.reliability.corpus import channel_bomb_flac
    from whisper_service.audio import decode_audio, resample

    def whole(data: bytes) -> np.ndarray:
        import io

        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, samples = f.samplerate, f.read(dtype="float32", always_2d=True)
        return resample(samples.mean(axis=1, dtype=np.float32), rate, 16_000)

    decode = {"whole": whole, "blocks": decode_audio}[path]
    # Warm up on 1 s of the same layout, not on the input itself: lazy imports and codec set-up are
    # not what is measured, but a full warm-up would leave the output's freed pages in the heap.
    decode(channel_bomb_flac(seconds=1))
    data = channel_bomb_flac()
    before = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    mono = decode(data)
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    return {"upload_kib": round(len(data) / 1024, 1), "output_samples": len(mono),
            "rss_rise_mib": round((peak - before) / MIB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per path")
    parser.add_argument("--one", choices=["whole", "blocks"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.common import machine, write_json

    runs: dict[str, list[dict]] = {"whole": [], "blocks": []}
    for _ in range(args.repeats):
        for path, results in runs.items():  # interleaved: a change in machine load hits both alike
            out = subprocess.run([sys.executable, __file__, "--one", path], cwd=ROOT, check=True,
                                 capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    rise = {path: max(r["rss_rise_mib"] for r in results) for path, results in runs.items()}
    payload = {
        "input": "60 s, 192 kHz, 8-channel FLAC silence (tests/reliability/corpus.py channel_bomb_flac)",
        "upload_kib": runs["blocks"][0]["upload_kib"],
        "output_samples": runs["blocks"][0]["output_samples"],
        "repeats": args.repeats,
        "rss_rise_mib": {"whole_file_baseline": rise["whole"], "blocks": rise["blocks"]},
        "runs": runs,
        "ratio_whole_over_blocks": round(rise["whole"] / max(rise["blocks"], 0.1), 1),
        "machine": machine(),
    }
    write_json("decode_memory", payload)


if __name__ == "__main__":
    main()

"""Benchmark `audio-pipeline export` per format: files/s and peak memory, against plain JSONL I/O.

A synthetic results root of N lines (100 per folder) with rpq-shaped tokens (25 per second of
its clip), each line with its own FLAC file: one of the 20 demo clips plus +-2 LSB of seeded
noise, so no two files share bytes (a repeated clip would let zstd shrink Parquet with audio to
a fraction and flatter its rate). The files are written just before the runs, so they are
mostly in the page cache: this measures the export, not the disk. Each measurement runs in a
fresh process: wall time of the export call alone (imports excluded) and the rise of peak RSS
during it. Rates at each N include each case's fixed start-up; the marginal rate between the
smallest and largest size, (n2 - n1) / (t2 - t1), leaves it out. Three sizes show whether
memory levels off. Baseline, in the same run: read every
JSONL line and write them gzip-compressed (the least any export must do). Prints JSON and
writes bench/results/export-cpu.json.

    uv run python bench/export.py --lines 2000 10000 20000
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.common import DEMO_AUDIO, machine, write_json  # noqa: E402

CASES = {  # name -> export() keyword arguments; None: the baseline
    "baseline-jsonl-gzip": None,
    "nemo": {"fmt": "nemo"},
    "lhotse": {"fmt": "lhotse"},
    "hf": {"fmt": "hf"},
    "hf-with-audio": {"fmt": "hf", "with_audio": True},
    "webdataset": {"fmt": "webdataset"},
}


def make_results(base: Path, n: int) -> Path:
    """N lines over N/100 folders, a manifest, and one audio symlink per line."""
    import numpy as np
    import soundfile as sf

    from tasks.manifest import write_manifest
    from tasks.records import RunSummary
    from tasks.settings import PipelineSettings

    sources = [sf.read(p, dtype="int16") for p in sorted(DEMO_AUDIO.rglob("*.flac"))]
    seconds = [len(x) / rate for x, rate in sources]
    rng = np.random.default_rng(0)
    audio, results = base / "audio", base / "results"
    results.mkdir(parents=True)
    for folder_start in range(0, n, 100):
        speaker = f"b{folder_start // 100:04d}"
        (audio / speaker).mkdir(parents=True)
        with open(results / f"{speaker}.jsonl", "w") as f:
            for i in range(folder_start, min(n, folder_start + 100)):
                file_id = f"{speaker}/{speaker}_{i:06d}_mic1.flac"
                src = i % len(sources)
                clip, rate = sources[src]
                noise = rng.integers(-2, 3, clip.shape, dtype=np.int32)
                sf.write(audio / file_id, (clip + noise).clip(-32768, 32767).astype(np.int16), rate, subtype="PCM_16")
                tokens = rng.integers(0, 8192, int(seconds[src] * 25)).tolist()
                f.write(json.dumps({"id": file_id, "transcription": f"utterance number {i} of the benchmark corpus.",
                                    "token_array": tokens}) + "\n")
    settings = PipelineSettings(audio_root=str(audio), results_root=str(results), tokenizer="simulated")
    summary = RunSummary(folders=-(-n // 100), files=n, lines=n, failed=0, audio_hours=0.0, wall_seconds=0.0,
                         files_per_second=0.0, results_root=str(results))
    write_manifest(str(results), settings=settings, health={}, summary=summary, run_id=None,
                   tokenizer_settings={"name": "simulated", "version": 1, "sample_rate": 16000, "frame_samples": 640,
                                       "hash": "blake2b-64", "vocab_size": 8192})
    return results


def measure(case: str, results: str, out: str) -> dict:
    """Run in a child process (see main): one case, its wall time and peak-RSS rise."""
    import resource

    import psutil

    from tasks.export import export

    kwargs = CASES[case]
    if kwargs and kwargs["fmt"] == "lhotse":
        import lhotse  # noqa: F401  imported before timing: it pulls in torch
    if kwargs and kwargs["fmt"] == "hf":
        import pyarrow as pa

        pa.Table.from_pylist([{"a": 1}])  # pyarrow imports pandas on its first table (seconds): not timed
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    if kwargs is None:
        lines = _baseline(Path(results), Path(out))
    else:
        kwargs = dict(kwargs)
        report = export(results, kwargs.pop("fmt"), out, **kwargs)
        assert report.failed == 0, report.errors[:3]
        lines = report.samples
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"lines": lines, "wall_s": round(wall, 3), "files_per_s": round(lines / wall, 1),
            "peak_rss_rise_mib": round(max(0, peak - rss_before) / 2**20, 1), "output_mib": round(size / 2**20, 2)}


def _baseline(results: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.open(out / "all.jsonl.gz", "wb", compresslevel=6) as dst:
        for path in sorted(results.glob("*.jsonl")):
            with open(path, "rb") as src:
                for line in src:
                    json.loads(line)  # every export parses each line
                    dst.write(line)
                    n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[2000, 10000, 20000])
    parser.add_argument("--child", nargs=3, metavar=("CASE", "RESULTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    figures: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.lines:
            results = make_results(Path(tmp) / f"n{n}", n)
            for case in CASES:
                out = Path(tmp) / f"n{n}-{case}"
                child = subprocess.run(
                    [sys.executable, __file__, "--child", case, str(results), str(out)],
                    check=True, capture_output=True, text=True,
                )
                figures.setdefault(case, {})[str(n)] = json.loads(child.stdout.strip().splitlines()[-1])
                print(case, n, figures[case][str(n)], file=sys.stderr)
    largest = str(max(args.lines))
    base = figures["baseline-jsonl-gzip"][largest]["files_per_s"]
    ratios = {case: round(f[largest]["files_per_s"] / base, 3) for case, f in figures.items()}
    summary: dict = {
        "machine": machine(), "lines": args.lines, "figures": figures,
        "files_per_s_vs_baseline_at_largest": ratios,
        "note": "audio: one distinct FLAC per line (demo clip + 2 LSB noise), freshly written (page cache); "
                "wall time excludes imports; peak_rss_rise: peak RSS during the call minus RSS before it",
    }
    if len(args.lines) >= 2:
        n1, n2 = str(min(args.lines)), str(max(args.lines))
        marginal = {case: round((int(n2) - int(n1)) / max(f[n2]["wall_s"] - f[n1]["wall_s"], 1e-3), 1)
                    for case, f in figures.items()}
        summary["marginal_files_per_s"] = marginal
        summary["marginal_vs_baseline"] = {
            case: round(rate / marginal["baseline-jsonl-gzip"], 3) for case, rate in marginal.items()
        }
    write_json("export", summary)


if __name__ == "__main__":
    main()

"""Long recordings (issue 22): bounded memory of the segmentation path (not a test).

`memory`: a worker's peak RSS when it segments a long file and reads every segment's span back
as the transcription stage uploads it (`read_span` + `span_flac`), on a 2-hour 44.1 kHz stereo
FLAC against the same code on a 3 s clip. Each runs in a fresh Python process whose peak RSS
(`ru_maxrss`, via psutil-free getrusage of the child) is read after it exits, so imports and the
ONNX session count on both sides and the difference is what the long file costs. The 2-hour
file is built without holding it: a 10-minute espeak recording, concatenated 12 times by sox.

    uv run python -m bench.longform memory --hours 2
JSON goes to bench/results/longform-memory-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

_WORKER = r"""
import json, sys, time
from tasks.audio_stream import open_source, read_span, span_flac
from tasks.records import AudioFile, SourceInfo
from tasks.segments import segment_source
from tasks.settings import SegmentOptions
path = sys.argv[1]
t0 = time.perf_counter()
listing = segment_source(AudioFile(id="x", path=path, source=SourceInfo(size=0, mtime="0")), SegmentOptions())
t1 = time.perf_counter()
uploaded = 0
with open_source(path) as f:
    for s in listing.segments:
        span, _, _, _ = read_span(f, s.start, s.end)
        uploaded += len(span_flac(span))
t2 = time.perf_counter()
lengths = [s.duration for s in listing.segments]
print(json.dumps({"duration_s": listing.duration, "segments": len(lengths), "longest_s": max(lengths, default=0),
                  "segment_seconds": t1 - t0, "spans_seconds": t2 - t1, "uploaded_bytes": uploaded}))
"""


def _child_peak(path: Path) -> dict:
    """Run the worker in a fresh process; its result plus its peak RSS in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", _WORKER, str(path)], check=True, capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb < before:  # ru_maxrss of children is the max over all waited children
        raise RuntimeError("peak went down: run each measurement in its own bench process")
    return {**json.loads(out.stdout), "peak_rss_mb": round(peak_kb / 1024, 1)}


def make_long_stereo(work: Path, hours: float) -> Path:
    """A `hours`-long 44.1 kHz stereo FLAC, built in 10-minute pieces by sox (never whole in memory)."""
    from tests.fixtures.longform import make_long_recording

    piece = make_long_recording(work / "piece.flac", 600, rate=44_100, channels=2, seed=7).path
    copies = max(1, round(hours * 6))
    out = work / "long.flac"
    subprocess.run(["sox", *[str(piece)] * copies, str(out)], check=True)
    return out


def make_clip(work: Path) -> Path:
    from tests.fixtures.longform import make_long_recording

    return make_long_recording(work / "clip.flac", 2.5, rate=44_100, channels=2, seed=8).path


def memory(args: argparse.Namespace) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="longform-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    long_file = work / "long.flac"
    if not long_file.exists():  # reused from an earlier run with --work
        long_file = make_long_stereo(work, args.hours)
    build_s = time.perf_counter() - t
    clip = make_clip(work)
    # One measurement per process: ru_maxrss of children is a running maximum.
    results = {}
    for name, path in (("clip", clip), ("long", long_file)):
        out = subprocess.run([sys.executable, "-m", "bench.longform", "_peak", str(path)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{name}: {out.stderr[-3000:]}")
        results[name] = {**json.loads(out.stdout), "file_mb": round(path.stat().st_size / 2**20, 1)}
    return {
        "what": "peak RSS of segmenting a file and reading every segment back (fresh process each)",
        "hours": args.hours, "build_seconds": round(build_s, 1),
        "clip": results["clip"], "long": results["long"],
        "extra_peak_rss_mb": round(results["long"]["peak_rss_mb"] - results["clip"]["peak_rss_mb"], 1),
        "goal_extra_mb": 300,
        "loadavg": open("/proc/loadavg").read().split()[:3], "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--hours", type=float, default=2.0)
    m.add_argument("--work", help="keep the built audio here (reused when present)")
    peak = sub.add_parser("_peak")
    peak.add_argument("path")
    args = parser.parse_args()
    if args.mode == "_peak":
        print(json.dumps(_child_peak(Path(args.path))))
        return
    result = memory(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "longform-memory-cpu.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

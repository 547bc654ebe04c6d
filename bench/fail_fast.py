"""How fast `audio-pipeline run` gives up when something is missing (not a test).

The reliability tests prove each give-up by what happened (exit code, message, requests sent,
nothing scheduled); how long it took is measured here instead, since a wall-clock bound in a test
fails on a slower or busier machine while the product is right (issue 19). Each case is the CLI
in a subprocess against a Prefect server of its own (SQLite, started before the clock runs):

- service_down: a --service-url nobody listens on: exit 2 before scheduling anything.
- dask_down: a --dask-address nobody listens on (connect timeout 2 s): exit 3 with the traceback.
- no_workers: a real `dask scheduler` without workers (AUDIO_PIPELINE_NO_WORKERS_TIMEOUT_S=3):
  the files are reported failed and the run ends, exit 1.

Goals on a 2-core CPU: the bounds the tests held until issue 19 (service_down 120 s, dask_down
180 s, no_workers 90 s; the in-process service-down check 30 s).

    uv run python bench/fail_fast.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from bench.common import DEMO_AUDIO, machine, setup_prefect_env, write_json  # noqa: E402
from bench.scale import REPO, prefect_server  # noqa: E402

GOALS_S = {"service_down": 120, "dask_down": 180, "no_workers": 90}


def cli(args: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    """`audio-pipeline <args>` to completion: (exit code, wall seconds)."""
    started = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.call([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT, timeout=600)
    return code, round(time.perf_counter() - started, 1)


def case(name: str, args: list[str], env: dict[str, str], tmp: Path, expect: int) -> dict:
    log = tmp / f"{name}.log"
    code, wall = cli(args, env, log)
    if code != expect:
        raise RuntimeError(f"{name}: exit {code}, expected {expect}; see {log}:\n{log.read_text()[-2000:]}")
    return {"case": name, "exit_code": code, "wall_s": wall, "goal_s": GOALS_S[name], "within_goal": wall <= GOALS_S[name]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fail_fast", help="bench/results/<out>-cpu.json")
    args = parser.parse_args()
    setup_prefect_env()
    from flows.demo import free_port, local_service

    figures = []
    with tempfile.TemporaryDirectory(prefix="fail-fast-bench-") as name:
        tmp = Path(name)
        audio = tmp / "audio"
        shutil.copytree(DEMO_AUDIO / "p225", audio / "p225")
        (tmp / "prefect").mkdir()
        with prefect_server(tmp / "prefect") as api_url, local_service() as url:
            env = {**os.environ, "PREFECT_API_URL": api_url, "AUDIO_PIPELINE_SHOW_PROGRESS": "false"}
            run = ["run", str(audio), "--tokenizer", "simulated"]
            dead_service = f"http://127.0.0.1:{free_port()}"
            figures.append(case("service_down", [*run, "--results", str(tmp / "r1"), "--service-url", dead_service],
                                env, tmp, expect=2))
            dead_dask = f"tcp://127.0.0.1:{free_port()}"
            figures.append(case("dask_down", [*run, "--results", str(tmp / "r2"), "--service-url", url,
                                              "--dask-address", dead_dask],
                                {**env, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}, tmp, expect=3))
            port = free_port()
            scheduler = subprocess.Popen([Path(sys.executable).parent / "dask", "scheduler", "--host", "127.0.0.1",
                                          "--port", str(port), "--dashboard-address", ":0", "--no-show"],
                                         cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                from distributed import Client

                with Client(f"tcp://127.0.0.1:{port}", timeout=60):  # the scheduler is up
                    pass
                figures.append(case("no_workers", [*run, "--results", str(tmp / "r3"), "--service-url", url,
                                                   "--dask-address", f"tcp://127.0.0.1:{port}"],
                                    {**env, "AUDIO_PIPELINE_NO_WORKERS_TIMEOUT_S": "3"}, tmp, expect=1))
            finally:
                scheduler.terminate()
                scheduler.wait(timeout=30)
    write_json(args.out, {"benchmark": "fail_fast", "machine": machine(), "load_average_1_5_15": os.getloadavg(),
                          "figures": figures, "goals_s": GOALS_S})


if __name__ == "__main__":
    main()

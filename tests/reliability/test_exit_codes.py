"""Exit codes and run states tell outcomes apart (issue 13; README "Exit codes").

0 every file has a line; 1 some files failed (listed), and the flow run ends Failed naming the
count; 2 the run could not start: one line, no traceback, nothing sent or written; 3 a crash,
with its traceback. Each through the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil

import pytest

from flows.demo import free_port
from tests.conftest import DEMO_AUDIO
from tests.metrics import transcribe_requests
from tests.reliability.conftest import cli_env, run_cli

CLIP = DEMO_AUDIO / "p225" / "p225_001_mic2.flac"


def one_good_one_corrupt(root):
    (root / "p1").mkdir(parents=True)
    shutil.copy(CLIP, root / "p1" / "good.flac")
    (root / "p1" / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 100)


def flow_run_of(audio_root: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("audio_root") == audio_root]
    assert len(runs) == 1, runs
    return runs[0]


# --- 2: could not start; checked before any work, one line, nothing written ---


@pytest.mark.parametrize("case", ["missing-audio-root", "results-under-a-file", "bad-tokeniser", "bad-option",
                                  "not-allowed", "foreign-results", "bad-batch-size", "export-inside-results",
                                  "bad-export-format"])
def test_a_run_that_cannot_start_exits_2_with_one_line(case, tmp_path):
    audio, results = tmp_path / "audio", tmp_path / "results"
    one_good_one_corrupt(audio)
    (tmp_path / "a-file").write_text("x")
    args = ["run", str(audio), "--results", str(results), "--service-url", f"http://127.0.0.1:{free_port()}"]
    env = cli_env("http://127.0.0.1:9/api")  # never reached: nothing may start before the checks pass
    expect = {
        "missing-audio-root": "audio root not found",
        "results-under-a-file": "is not writable",
        "bad-tokeniser": "unknown tokeniser 'nope'",
        "bad-option": "unknown option(s) ['bogus']",
        "not-allowed": "outside the allowed roots",
        "foreign-results": "holds the results of audio root",
        "bad-batch-size": "bad settings: batch_size",
        "export-inside-results": "is inside the results root",
        "bad-export-format": "unknown export format(s) tfrecord",
    }[case]
    if case == "missing-audio-root":
        args[1] = str(tmp_path / "nope")
    elif case == "results-under-a-file":
        args[3] = str(tmp_path / "a-file" / "results")
    elif case == "bad-tokeniser":
        args += ["--tokenizer", "nope"]
    elif case == "bad-option":
        env["AUDIO_PIPELINE_TOKENIZER_OPTIONS"] = json.dumps({"bogus": 1})
        args += ["--tokenizer", "simulated"]
    elif case == "not-allowed":
        env["AUDIO_PIPELINE_ALLOWED_ROOTS"] = str(tmp_path / "elsewhere")
    elif case == "foreign-results":
        results.mkdir()
        (results / "_owner.json").write_text(json.dumps({"audio_root": "/some/other/corpus"}))
    elif case == "bad-batch-size":
        args += ["--batch-size", "0"]
    elif case == "export-inside-results":
        args += ["--export", "nemo", "--export-root", str(results / "exports")]
    elif case == "bad-export-format":
        args += ["--export", "nemo,tfrecord"]
    code, output = run_cli(args, env, tmp_path / "cli.log", timeout_s=180)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and expect in errors[-1], output
    assert "Traceback" not in output
    if case != "foreign-results":
        assert not results.exists()  # nothing written, not even the owner record


# --- 1: some files failed; 0 when within --max-failed-fraction; the run state says the same ---


@pytest.mark.slow
def test_failed_files_exit_1_and_the_run_ends_failed(tmp_path, whisper_service_url, prefect_api_url, dask_cluster):
    audio = tmp_path / "audio"
    one_good_one_corrupt(audio)
    args = ["run", str(audio), "--service-url", whisper_service_url, "--tokenizer", "simulated",
            "--dask-address", dask_cluster["address"]]
    env = cli_env(prefect_api_url)
    code, output = run_cli([*args, "--results", str(tmp_path / "r1")], env, tmp_path / "one.log")
    assert code == 1, output
    assert "1 file(s) failed" in output and "p1/corrupt.flac [decode]" in output
    assert "Traceback" not in output
    run = flow_run_of(str(audio))
    assert run.state.type.value == "FAILED" and run.state.message.startswith("1 of 2 files failed"), run.state

    # the same outcome, accepted: half the files may fail
    shutil.rmtree(tmp_path / "r1")
    code, output = run_cli([*args, "--results", str(tmp_path / "r1"), "--max-failed-fraction", "0.5"],
                           env, tmp_path / "half.log")
    assert code == 0, output
    assert "1 file(s) failed" in output  # still listed


# --- 3: an unexpected crash, with its traceback ---


@pytest.mark.slow
def test_a_crash_exits_3_with_the_traceback(tmp_path, whisper_service_url, prefect_api_url):
    audio = tmp_path / "audio"
    one_good_one_corrupt(audio)
    nobody = f"tcp://127.0.0.1:{free_port()}"  # no scheduler there: the task runner cannot start
    env = cli_env(prefect_api_url, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    before = transcribe_requests(whisper_service_url)
    code, output = run_cli(["run", str(audio), "--results", str(tmp_path / "r"), "--service-url", whisper_service_url,
                            "--tokenizer", "simulated", "--dask-address", nobody], env, tmp_path / "crash.log")
    assert code == 3, output
    assert "Traceback (most recent call last)" in output and "error: the run crashed (exit 3)" in output
    assert transcribe_requests(whisper_service_url) == before  # crashed before sending anything

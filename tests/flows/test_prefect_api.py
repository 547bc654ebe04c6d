"""The CLI's temporary Prefect server: Prefect's own command, started early, drained and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.prefect_api import RECORD, SERVER_ENV, healthy, uvicorn_command


def test_the_command_is_the_one_prefect_runs_for_its_temporary_server(monkeypatch):
    """Pinned to Prefect's `SubprocessASGIServer`: an upgrade that changes it fails here first."""
    import prefect.server.api.server as server_module

    seen: dict = {}

    def capture(args, env=None, **kwargs):
        seen.update(args=args, env=env)
        raise RuntimeError("captured")

    monkeypatch.setattr(server_module.subprocess, "Popen", capture)
    with pytest.raises(RuntimeError, match="captured"):
        server_module.SubprocessASGIServer(port=45678)._run_uvicorn_command()
    assert seen["args"] == uvicorn_command(45678)
    assert {k: seen["env"][k] for k in SERVER_ENV} == SERVER_ENV


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=400)


def _env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600", **extra}


def test_a_configured_api_starts_nothing(tmp_path):
    out = _python(
        """
        from flows.prefect_api import prefect_api
        with prefect_api() as server:
            print(server)
        """,
        _env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


@pytest.mark.slow
def test_a_temporary_server_serves_the_flow_and_stops_after_it(tmp_path):
    """The flow uses the server started before it (no second temporary server), its logs reach
    the server before it stops (no 'Error logging to API' retries at exit), and it is stopped."""
    out = _python(
        """
        import os
        from prefect import flow, get_run_logger
        from flows.prefect_api import prefect_api

        @flow
        def hello() -> str:
            get_run_logger().info("hello from the flow")
            return os.environ["PREFECT_API_URL"]

        with prefect_api("temporary") as server:
            server.wait_ready()
            used = hello()
        print(used == server.api_url, server.process.poll() is not None, "PREFECT_API_URL" in os.environ)
        """,
        _env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == ["True", "True", "False"], out.stdout + out.stderr
    assert "Starting temporary server" not in out.stderr  # Prefect did not start one of its own
    assert "Error logging to API" not in out.stdout + out.stderr


KEPT_RUN = """
import os, sys
from prefect import flow
from flows.prefect_api import prefect_api

@flow
def hello() -> str:
    return os.environ["PREFECT_API_URL"]

with prefect_api("keep", idle_s=float(sys.argv[1])) as server:
    started_here = server.process is not None
    server.wait_ready()
    assert hello() == server.api_url
print(server.api_url, started_here)
"""


@pytest.mark.slow
def test_a_kept_server_serves_the_next_run_and_stops_itself_when_idle(tmp_path):
    """The first run starts the server, the second finds it ready (no start-up on a rerun),
    and it stops by itself once idle: nothing is left running for good."""
    env = _env(tmp_path)
    runs = [subprocess.run([sys.executable, "-c", KEPT_RUN, "20"], env=env, capture_output=True, text=True,
                           timeout=400) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    (first_url, first_started), (second_url, second_started) = (r.stdout.split()[-2:] for r in runs)
    assert first_started == "True" and second_started == "False"
    assert first_url == second_url
    record = json.loads((tmp_path / "prefect-home" / RECORD).read_text())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and Path(f"/proc/{record['pid']}").exists():
        time.sleep(1)
    assert not healthy(first_url), "the kept server did not stop after 20 s without a request"
    assert not Path(f"/proc/{record['pid']}").exists() or b"zombie" in Path(f"/proc/{record['pid']}/status").read_bytes()


@pytest.mark.slow
def test_a_kept_server_stays_up_under_a_run_that_holds_it_and_sends_nothing(tmp_path):
    """A run whose tasks report nothing for longer than the idle time (one big shard on a slow
    CPU) keeps its server: a 2,000-clip run lost it after 10 silent minutes and crashed on
    `Connection refused` when the flow reported its end. Once the run lets go, it stops as before."""
    out = _python(
        """
        import time
        from flows.prefect_api import healthy, prefect_api
        with prefect_api("keep", idle_s=4.0) as server:
            server.wait_ready()
            time.sleep(12)  # three idle times, no request of the run's own
            print(healthy(server.api_url), server.api_url)
        """,
        _env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    held, url = out.stdout.split()[-2:]
    assert held == "True", "the kept server stopped under a run that was still holding it"
    pid = json.loads((tmp_path / "prefect-home" / RECORD).read_text())["pid"]
    deadline = time.monotonic() + 60  # watched through /proc: a request would reset its idle clock
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(1)
    assert not healthy(url), "the kept server did not stop once the run let go"


@pytest.mark.slow
def test_a_second_run_waits_for_a_kept_server_still_starting_instead_of_replacing_it(tmp_path):
    """Two first runs at once: the second must not kill the first's server while it starts."""
    out = _python(
        """
        from flows.prefect_api import kept_server
        first = kept_server(30.0)
        second = kept_server(30.0)  # at once: the first is still importing Prefect's server
        print(second.process is None, second.port == first.port)
        second.wait_ready()
        print(first.process.poll() is None)
        first.stop()
        """,
        _env(tmp_path),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"], out.stdout + out.stderr


@pytest.mark.slow
def test_a_record_naming_another_homes_server_neither_reuses_nor_stops_it(tmp_path):
    """A kept server is known by its whole command line (its port and Prefect home included), not
    by its pid: pids wrap, so a stale record's pid can belong to another home's new server, and
    a record copied between homes names a server with another database. Either way the run
    starts a server of its own and leaves the other running."""
    start_a = _python(
        """
        from flows.prefect_api import kept_server
        server = kept_server(120.0)
        server.wait_ready()
        print(server.port, server.process.pid)
        """,
        _env(tmp_path / "a"),
    )
    assert start_a.returncode == 0, start_a.stderr
    port_a, pid_a = (int(x) for x in start_a.stdout.split()[-2:])
    record_a = json.loads((tmp_path / "a" / "prefect-home" / RECORD).read_text())
    try:
        # "stale": this home's own server, gone an hour ago; its pid now runs home a's server.
        stale_home = str(tmp_path / "stale" / "prefect-home")
        stale = {**record_a, "port": 9, "started": time.time() - 3600, "command": [
            sys.executable, "-m", "flows.local_server", "--port", "9", "--idle-s", "120.0", "--home", stale_home]}
        for name, record in {"copied": record_a, "stale": stale}.items():
            home = tmp_path / name / "prefect-home"
            home.mkdir(parents=True)
            (home / RECORD).write_text(json.dumps(record))
            out = _python(
                """
                from flows.prefect_api import kept_server
                server = kept_server(120.0)
                print(server.process is not None, server.port)
                server.stop()  # not waited for: only which server this home chose matters
                """,
                _env(tmp_path / name),
            )
            assert out.returncode == 0, out.stderr
            started_own, port = out.stdout.split()[-2:]
            assert started_own == "True" and int(port) != port_a, f"{name}: used home a's server"
            assert healthy(f"http://127.0.0.1:{port_a}/api"), f"{name}: home a's server was stopped"
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid_a, signal.SIGTERM)


def test_a_started_process_shows_its_command_once_wait_exec_returns():
    """Right after Popen, /proc/PID/cmdline can still read empty (the child is inside execve):
    21 of 200 starts here. A kept server's record is written only after `wait_exec`, so the next
    run reading it sees the server's command, not "no such server" (which made it start another)."""
    from flows.prefect_api import runs, wait_exec

    command = ["sleep", "30"]
    children, unseen = [], 0
    try:
        for _ in range(100):
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     start_new_session=True)  # as LocalServer.start(detach=True)
            children.append(child)
            wait_exec(child, command)
            unseen += not runs(child.pid, command)
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert unseen == 0, f"{unseen} of 100 started processes did not show their command yet"

"""The local Dask cluster the runner plans: workers ready before the first task, no fixed ports."""

from __future__ import annotations

import socket
import sys
import warnings

import pytest
from distributed import Client, LocalCluster

from flows.runner import WORKER_PRELOAD, cluster_plan
from tasks.settings import PipelineSettings


@pytest.fixture(scope="module")
def port_8787_taken():
    """What another run's scheduler (or a user's Dask dashboard) does to this machine."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8787))
        except OSError:
            pass  # already taken by someone else: just as good
        else:
            s.listen()
        yield


WARM = ("torch", "prefect", "tasks.transcribe", "tasks.tokenise", "tasks.tokenisers.rpq", "tasks.merge")


@pytest.mark.slow
def test_local_cluster_preloads_task_modules_and_takes_no_fixed_port(port_8787_taken):
    """Regressions:
    - the first task's unpickling imported torch and Prefect on the worker's event loop; on a loaded
      machine that blocked it for over a minute, the scheduler dropped the worker, the worker shut
      down, and the flow waited forever. Workers now import the task modules when they start.
    - with `dashboard_address=None` the scheduler still bound port 8787 for its HTTP routes; with it
      taken, distributed warned "Port 8787 is already in use", an error where warnings are errors.
    """
    # Worker processes (several workers); a lone worker runs as threads of the flow process.
    plan = cluster_plan(PipelineSettings(audio_root="/a", n_workers=2, threads_per_worker=1), gpus=0)
    assert plan["cluster_kwargs"]["preload"] == list(WORKER_PRELOAD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cluster = LocalCluster(**plan["cluster_kwargs"])
    with cluster, Client(cluster) as client:
        loaded = client.run(lambda: [m for m in (*WORKER_PRELOAD, *WARM) if m in sys.modules])
    assert list(loaded.values()) == [[*WORKER_PRELOAD, *WARM]] * 2

"""Task-runner choice for 0, 1 and N GPUs and an existing scheduler; real clusters where possible."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.runner import NVIDIA_DRIVER, cluster_plan, make_task_runner, visible_gpu_count, worker_count
from tasks.settings import PipelineSettings


def settings(**kw) -> PipelineSettings:
    return PipelineSettings(audio_root="/data", **kw)


def test_no_gpu_plans_a_plain_local_cluster():
    plan = cluster_plan(settings(n_workers=3), gpus=0)
    assert plan["kind"] == "local"
    assert plan["cluster_class"] == "distributed.LocalCluster"
    assert plan["cluster_kwargs"]["n_workers"] == 3
    assert "resources" not in plan["cluster_kwargs"]


@pytest.mark.parametrize("gpus", [1, 4])
def test_gpus_plan_one_cuda_worker_per_gpu_with_a_gpu_resource(gpus):
    plan = cluster_plan(settings(n_workers=7), gpus=gpus)
    assert plan["kind"] == "local-cuda"
    assert plan["cluster_class"] == "dask_cuda.LocalCUDACluster"
    assert plan["cluster_kwargs"]["n_workers"] == gpus  # one per GPU; --workers does not apply
    assert plan["cluster_kwargs"]["resources"] == {"GPU": 1}
    assert worker_count(settings(), gpus=gpus) == gpus


def test_existing_scheduler_wins_over_gpus():
    plan = cluster_plan(settings(dask_address="tcp://10.0.0.1:8786"), gpus=8)
    assert plan == {"kind": "existing", "address": "tcp://10.0.0.1:8786"}
    runner = make_task_runner(settings(dask_address="tcp://10.0.0.1:8786"))
    assert runner.address == "tcp://10.0.0.1:8786"


def test_detection_on_this_machine_matches_torch():
    import torch

    expected = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert visible_gpu_count() == expected
    kind = cluster_plan(settings()).get("kind")
    assert kind == ("local-cuda" if expected else "local")


@pytest.mark.skipif(os.path.exists(NVIDIA_DRIVER), reason="with an NVIDIA driver the flow asks torch to count GPUs")
def test_flow_process_does_not_import_torch_without_a_gpu_driver():
    """torch is the workers' business: importing it cost every run's start ~6-10 s in the flow process."""
    code = "import sys, flows.pipeline, flows.runner as r; r.cluster_plan(r.PipelineSettings(audio_root='/a')); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_one_local_worker_is_threads_of_this_process_several_are_processes():
    """A lone worker process bought only start-up time (~9 s of CPU importing Prefect and torch
    again on a 2-core machine); several let CPU-bound stages use every core past the GIL."""
    one = cluster_plan(settings(n_workers=1), gpus=0)["cluster_kwargs"]
    assert one["processes"] is False and "preload" not in one
    two = cluster_plan(settings(n_workers=2), gpus=0)["cluster_kwargs"]
    assert two["processes"] is True and two["preload"] == ["tasks.worker"]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("n_workers", [1, 2])
def test_cpu_runner_runs_tasks_on_a_real_local_cluster(n_workers):
    """The CPU fallback builds a working cluster (no NVML needed) and runs tasks in its workers:
    threads of this process for one worker, worker processes for several."""
    import os

    from prefect import flow, task

    from flows.pipeline import share_api_url_with_workers

    @task
    def worker_pid() -> int:
        return os.getpid()

    @flow(task_runner=make_task_runner(settings(n_workers=n_workers, threads_per_worker=1), gpus=0))
    def tiny() -> int:
        return worker_pid.submit().result()

    share_api_url_with_workers()  # before the cluster starts: workers inherit the environment
    in_this_process = tiny() == os.getpid()
    assert in_this_process is (n_workers == 1)


@pytest.mark.gpu
def test_local_cuda_cluster_has_one_worker_per_visible_gpu():
    import torch
    from distributed import Client

    plan = cluster_plan(settings())
    from dask_cuda import LocalCUDACluster

    with LocalCUDACluster(**plan["cluster_kwargs"]) as cluster, Client(cluster) as client:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == torch.cuda.device_count()
        assert all(w["resources"] == {"GPU": 1} for w in workers)


@pytest.mark.skipif(os.path.exists(NVIDIA_DRIVER), reason="with a GPU the workers are processes of their own")
def test_the_tokeniser_is_built_in_the_background_only_where_tasks_run_in_this_process():
    """The one local worker is threads of this process: `start(settings)` builds the tokeniser there
    while the cluster starts, and the tokenise task then gets that same cached instance."""
    from flows.runner import runs_tasks_in_this_process, warm_tokeniser
    from tasks.tokenise import _cached_tokeniser, tokeniser_for

    assert runs_tasks_in_this_process(settings(n_workers=1))
    assert not runs_tasks_in_this_process(settings(n_workers=2))  # worker processes: they build their own
    assert not runs_tasks_in_this_process(settings(dask_address="tcp://10.0.0.1:8786"))
    one = settings(n_workers=1, tokenizer="rpq", tokenizer_options={"seed": 1234})
    before = _cached_tokeniser.cache_info()
    warm_tokeniser(one).join(timeout=300)
    after = _cached_tokeniser.cache_info()
    assert after.misses == before.misses + 1  # built once, by the warm-up
    tokeniser = tokeniser_for(one)
    assert _cached_tokeniser.cache_info().hits == after.hits + 1  # the task's call reuses it
    assert tokeniser.settings["seed"] == 1234

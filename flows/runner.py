"""The only module that knows Dask: choose the task runner for this machine and these settings.

- `dask_address` set: connect to that scheduler (dask-jobqueue, Kubernetes, Coiled, ...).
- GPUs visible: `dask_cuda.LocalCUDACluster`, one worker per GPU (it honours
  CUDA_VISIBLE_DEVICES), a `GPU` resource so each GPU runs one tokenisation task at a time,
  and a few threads per worker so HTTP-bound transcription runs beside it.
- otherwise: a plain `LocalCluster`.
LocalCUDACluster raises NVMLError on a machine without a GPU, so we detect first.
"""

from __future__ import annotations

import os
from typing import Any

from prefect_dask import DaskTaskRunner

from tasks.settings import PipelineSettings

GPU_RESOURCE = "GPU"


def visible_gpu_count() -> int:
    """GPUs this process may use (respects CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cluster_plan(settings: PipelineSettings, gpus: int | None = None) -> dict[str, Any]:
    """What `make_task_runner` will build, as plain data (logged, and tested on any machine)."""
    if settings.dask_address:
        return {"kind": "existing", "address": settings.dask_address}
    gpus = visible_gpu_count() if gpus is None else gpus
    if gpus > 0:
        return {
            "kind": "local-cuda",
            "cluster_class": "dask_cuda.LocalCUDACluster",
            "cluster_kwargs": {
                "n_workers": gpus,
                "threads_per_worker": settings.threads_per_worker,
                "resources": {GPU_RESOURCE: 1},
                "dashboard_address": None,
            },
        }
    n_workers = settings.n_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    return {
        "kind": "local",
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {
            "n_workers": n_workers,
            "threads_per_worker": settings.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        },
    }


def make_task_runner(settings: PipelineSettings, gpus: int | None = None) -> DaskTaskRunner:
    plan = cluster_plan(settings, gpus)
    if plan["kind"] == "existing":
        return DaskTaskRunner(address=plan["address"])
    return DaskTaskRunner(cluster_class=plan["cluster_class"], cluster_kwargs=plan["cluster_kwargs"])


def worker_count(settings: PipelineSettings, gpus: int | None = None) -> int:
    """How many workers the plan gives (an existing cluster counts as 4 for sharding)."""
    plan = cluster_plan(settings, gpus)
    return plan.get("cluster_kwargs", {}).get("n_workers", 4)


def uses_gpu_resources(settings: PipelineSettings, gpus: int | None = None) -> bool:
    return cluster_plan(settings, gpus)["kind"] == "local-cuda"

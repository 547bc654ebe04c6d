"""The only module that knows Dask: choose the task runner for this machine and these settings.

- `dask_address` set: connect to that scheduler (dask-jobqueue, Kubernetes, Coiled, ...).
- GPUs visible: `dask_cuda.LocalCUDACluster`, one worker per GPU (it honours
  CUDA_VISIBLE_DEVICES), a `GPU` resource so each GPU runs one tokenisation task at a time,
  and a few threads per worker so HTTP-bound transcription runs beside it.
- otherwise: a plain `LocalCluster`; its workers are threads of this process when there is one
  (the default on 2-3 cores), processes when there are several.
LocalCUDACluster raises NVMLError on a machine without a GPU, so we detect first.

Workers import the task modules (torch, Prefect) when they start (`preload` of `tasks.worker`),
not when the first task arrives: unpickling a task runs on the worker's event loop, and on a
loaded 2-core machine that import blocked it for over a minute, the scheduler dropped the silent
worker, the worker shut itself down, and the flow waited forever for workers that no longer
existed. Workers of an existing cluster should do the same: `dask worker ADDRESS --preload tasks.worker`.

`memory://` roots live in one process's memory: worker processes would each see an empty
filesystem of their own (their writes lost to the merge, the audio invisible to them). With a
`memory://` audio or results root the local cluster therefore runs its workers as threads of
this process (`processes=False`), and an existing scheduler is refused.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from typing import TYPE_CHECKING

from fsspec.core import split_protocol
from prefect.task_runners import TaskRunner

from tasks.settings import PipelineSettings

if TYPE_CHECKING:  # imported when a cluster is made: a rerun with nothing to do never loads Dask
    from prefect_dask import DaskTaskRunner

GPU_RESOURCE = "GPU"
WORKER_PRELOAD = ("tasks.worker",)  # see the module docstring
# The scheduler serves /health and /metrics over HTTP even without a dashboard, on port 8787 unless
# told otherwise: a second run (or any Dask/Jupyter on this machine) then hit "Port 8787 is already
# in use", a UserWarning that fails the cluster's start wherever warnings are errors.
NO_DASHBOARD = {"dashboard": False, "dashboard_address": ":0"}
PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})  # filesystems that exist only inside one process


def needs_shared_process(settings: PipelineSettings) -> bool:
    """True when a root is process-local (memory://), so workers must be threads of this process."""
    roots = (settings.audio_root, settings.results_root)
    return any(split_protocol(root)[0] in PROCESS_LOCAL_PROTOCOLS for root in roots)


NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present on Linux whenever the kernel driver is loaded


def visible_gpu_count() -> int:
    """GPUs this process may use (respects CUDA_VISIBLE_DEVICES); 0 without CUDA.

    Without an NVIDIA driver there is nothing to count, and the flow process is spared
    importing torch (seconds, on the path of every run's start).
    """
    if not os.path.exists(NVIDIA_DRIVER):
        return 0
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cluster_plan(settings: PipelineSettings, gpus: int | None = None) -> dict[str, Any]:
    """What `make_task_runner` will build, as plain data (logged, and tested on any machine)."""
    in_process = needs_shared_process(settings)
    if settings.dask_address:
        if in_process:
            raise ValueError(
                "a memory:// audio or results root exists only in this process; an existing Dask "
                "cluster's workers cannot see it. Use a local path or a shared URL (s3://, gcs://), "
                "or drop --dask-address."
            )
        return {"kind": "existing", "address": settings.dask_address}
    gpus = visible_gpu_count() if gpus is None else gpus
    if gpus > 0 and not in_process:
        return {
            "kind": "local-cuda",
            "cluster_class": "dask_cuda.LocalCUDACluster",
            "cluster_kwargs": {
                "n_workers": gpus,
                "threads_per_worker": settings.threads_per_worker,
                "resources": {GPU_RESOURCE: 1},
                "dashboard_address": None,
                "scheduler_kwargs": dict(NO_DASHBOARD),
                "preload": list(WORKER_PRELOAD),
            },
        }
    n_workers = settings.n_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
    # One local worker runs as threads of this process: a worker process would only add its
    # start-up (a Python, Prefect and torch imported again: ~9 s of CPU before the first task on
    # a 2-core machine) and a second copy of those modules in memory; with several, processes
    # let tokenising and merging use every core past the GIL.
    processes = not in_process and n_workers > 1
    return {
        "kind": "local",
        "cluster_class": "distributed.LocalCluster",
        "cluster_kwargs": {
            "n_workers": n_workers,
            "threads_per_worker": settings.threads_per_worker,
            "processes": processes,
            "dashboard_address": None,
            "scheduler_kwargs": dict(NO_DASHBOARD),
            # Threads of this process import the task modules as the flow does (no event loop
            # to block while unpickling); a preload there would only delay the cluster's start.
            **({"preload": list(WORKER_PRELOAD)} if processes else {}),
        },
    }


def runs_tasks_in_this_process(settings: PipelineSettings) -> bool:
    """True when the local cluster's one worker is threads of this process (`cluster_plan`)."""
    try:
        plan = cluster_plan(settings)
    except ValueError:  # a refused plan: make_task_runner raises it
        return False
    return plan["kind"] == "local" and not plan["cluster_kwargs"]["processes"]


def warm_tokeniser(settings: PipelineSettings) -> threading.Thread:
    """Build the tokeniser in a background thread of this process, now.

    When the tasks run as threads of this process, the first tokenise task would otherwise
    start importing torch (~3.5 s of CPU on 2 cores) only once the cluster is up; started here,
    the import overlaps the cluster's start and the first transcriptions (which wait on the
    service). The task then gets the same cached tokeniser (`tasks.tokenise.tokeniser_for`). A
    failure here is left for the task to raise and report, as it would without the warm-up.
    """

    def build() -> None:
        from tasks.tokenise import tokeniser_for

        with contextlib.suppress(Exception):
            tokeniser_for(settings)

    thread = threading.Thread(target=build, name="tokeniser-warm-up", daemon=True)
    thread.start()
    return thread


def make_task_runner(settings: PipelineSettings, gpus: int | None = None) -> DaskTaskRunner:
    from prefect_dask import DaskTaskRunner

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


class PipelineTaskRunner(TaskRunner):
    """The flow's task runner: Dask, built by `start(settings)` once the flow has its settings.

    The task runner must be the flow's own (so the task runs show on the run users open, not on
    a subflow), yet which Dask cluster to start depends on the parameters, known only inside the
    flow. Prefect enters this runner when the flow starts (cheap: nothing is built); the flow
    validates its settings and plans the run, then calls `start`, which enters the
    `DaskTaskRunner` that `make_task_runner` chooses. Submits go to it; it closes with the flow.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stack = contextlib.ExitStack()
        self.dask: DaskTaskRunner | None = None

    def duplicate(self) -> PipelineTaskRunner:
        return type(self)()

    def start(self, settings: PipelineSettings, tokenising: bool = True) -> DaskTaskRunner:
        """Start the cluster; with `tokenising`, build the tokeniser meanwhile when tasks run here."""
        if self.dask is None:
            if tokenising and runs_tasks_in_this_process(settings):
                warm_tokeniser(settings)
            self.dask = self._stack.enter_context(make_task_runner(settings))
        return self.dask

    @property
    def client(self):
        if self.dask is None:
            raise RuntimeError("the task runner is not started: call start(settings) first")
        return self.dask.client

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if self.dask is None:
            raise RuntimeError("the task runner is not started: call start(settings) first")
        return self.dask.submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def map(self, task, parameters, wait_for=None):
        if self.dask is None:
            raise RuntimeError("the task runner is not started: call start(settings) first")
        return self.dask.map(task, parameters, wait_for=wait_for)

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.__exit__(*exc)
        finally:
            self.dask = None
            super().__exit__(*exc)

"""The pipeline's plain functions in the flow's order (discover, both stages, merge per folder),
without Prefect or Dask, on real FLAC files; plus a filesystem that counts storage requests."""

from __future__ import annotations

import json
import uuid
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import httpx
import numpy as np
import soundfile as sf
from fsspec.implementations.memory import MemoryFileSystem

from tasks.discover import AudioRoot, list_audio, make_batches
from tasks.merge import merge_folder
from tasks.records import FolderReport, OutputOptions, Provenance, StageReport
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokenise_batches, tokeniser_for
from tasks.transcribe import transcribe_files

SIMULATED = {"tokenizer": "simulated", "tokenizer_options": {"workload_size": 0}}


def write_clip(path: Path, seed: int, seconds: float = 0.4) -> Path:
    """A real 16 kHz FLAC: a tone plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16_000 * seconds)) / 16_000
    audio = 0.3 * np.sin(2 * np.pi * (200 + 37 * seed) * t) + 0.05 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio.astype(np.float32), 16_000, format="FLAC")
    return path


def make_corpus(root: Path, folders: dict[str, int], seed: int = 0, seconds: float = 0.4) -> None:
    for folder, n in folders.items():
        for i in range(n):
            write_clip(root / folder / f"{folder}_{i:03d}.flac",
                       seed * 10_000 + zlib.crc32(folder.encode()) % 1000 * 10 + i, seconds)


def settings_for(audio: Path, results: str, service_url: str, **overrides: object) -> PipelineSettings:
    return PipelineSettings(**{
        "audio_root": str(audio), "results_root": results, "service_url": service_url, "http_retries": 0,
        "http_backoff_s": 0.0, "batch_size": 4, **SIMULATED, **overrides,
    })


def expect_for(settings: PipelineSettings, tokenizer_settings: dict | None = None) -> Provenance:
    """What the flow builds: the fingerprint `/healthz` names, the language asked for, the
    tokeniser's settings JSON round-tripped."""
    health = httpx.get(f"{settings.service_url}/healthz", timeout=5).json()
    if tokenizer_settings is None:
        tokenizer_settings = json.loads(json.dumps(tokeniser_for(settings).settings))
    return Provenance(decode_fingerprint=health.get("fingerprint"), language=settings.language,
                      tokenizer_settings=tokenizer_settings)


@dataclass
class Run:
    stages: list[StageReport] = field(default_factory=list)
    stage_errors: dict[str, str] = field(default_factory=dict)
    folders: dict[str, FolderReport] = field(default_factory=dict)

    def stage(self, name: str) -> StageReport:
        return next(s for s in self.stages if s.stage == name)


def run_steps(settings: PipelineSettings, store: Store, expect: Provenance,
              output: OutputOptions = OutputOptions()) -> Run:  # noqa: B008
    """One run: both stages (a stage that raises fails "outright", as a failed task would), then
    every folder's merge with the stage's exception text, as the flow passes it. Each call is a
    run of its own: a fresh `run_id` unless `expect` names one (as the flow stamps its run's id)."""
    if expect.run_id is None:
        expect = expect.model_copy(update={"run_id": uuid.uuid4().hex})
    files, discover_errors = list_audio(settings.audio_root, settings.extensions,
                                        verify_content=settings.verify_content)
    run = Run()
    for name, call in (
        ("transcribe", lambda: transcribe_files(files, settings, store, expect)),
        ("tokenise", lambda: tokenise_batches(make_batches(files, settings.batch_size), settings, store, expect)),
    ):
        try:
            run.stages.append(call())
        except Exception as e:  # noqa: BLE001 (what Prefect would record as the task's failure)
            run.stage_errors[name] = f"{type(e).__name__}: {e}"
    by_folder = defaultdict(list)
    for f in files:
        by_folder[f.folder].append(f)
    for folder, group in sorted(by_folder.items()):
        known = [e for e in discover_errors if e.id.startswith(folder + "/")]
        audio = AudioRoot(settings.audio_root, settings.extensions, settings.verify_content)
        run.folders[folder] = merge_folder(folder, group, store, expect, known, run.stage_errors or None, output, audio)
    return run


def read_jsonl(store: Store, relative: str) -> list[dict]:
    data = store.read_bytes(relative)
    return [json.loads(x) for x in data.decode().splitlines()] if data is not None else []


class CountingMemoryFS(MemoryFileSystem):
    """fsspec's memory filesystem that counts every storage request, as an object store bills them.

    A bulk `cat_ranges` counts one request per file it reads (an object store sends one GET each).
    """

    protocol = ("countmem", "memory")  # "memory": Store treats it as an object store (whole PUTs)
    requests: Counter = Counter()
    bytes_read: Counter = Counter()  # by path (without protocol), what `cat_file` returned

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("countmem://"):
            path = "memory://" + path[len("countmem://"):]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"countmem://{name.lstrip('/')}"

    def _count(self, op: str) -> None:
        CountingMemoryFS.requests[op] += 1

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._count("get")
        data = super().cat_file(path, start, end, **kwargs)
        CountingMemoryFS.bytes_read[self._strip_protocol(path)] += len(data)
        return data

    def put_file(self, lpath, rpath, *args, **kwargs):
        self._count("put")  # one PUT (multipart for a large file) on an object store
        return super().put_file(lpath, rpath, *args, **kwargs)

    def pipe_file(self, path, value, *args, **kwargs):
        self._count("put")
        return super().pipe_file(path, value, *args, **kwargs)

    def rm_file(self, path):
        self._count("delete")
        return super().rm_file(path)

    def info(self, path, **kwargs):
        self._count("head")
        return super().info(path, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        self._count("list")
        return super().ls(path, detail=detail, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:  # writes are counted as the `pipe_file` that opened them
            self._count("open")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countmem", CountingMemoryFS, clobber=True)


def total_requests() -> int:
    return sum(CountingMemoryFS.requests.values())

"""The pipeline's one settings object: env vars (`AUDIO_PIPELINE_*`), CLI flags and flow parameters.

Built once at the edge (CLI or flow entry) and passed down to every task; Dask ships it to
workers by pickling, so it holds plain values only.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_EXTENSIONS = (".flac", ".wav", ".mp3", ".ogg")
EXPORT_FORMATS = ("lhotse", "hf", "webdataset", "nemo")  # `tasks.export`


class SegmentOptions(BaseModel):
    """How long recordings are cut into training segments (issue 22; `tasks.segments`).

    `segment_over_s` and `no_segment` choose which files are segmented; the rest describe how,
    and make the segmentation fingerprint (with the VAD model's hash): changing one of them
    re-segments long files only. Defaults measured in bench/longform.py.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    segment_over_s: float = Field(30.0, gt=0, description="Files longer than this (seconds) are segmented.")
    no_segment: bool = Field(False, description="Keep every file whole, however long (one line per file).")
    min_segment_s: float = Field(22.0, ge=0, le=30, description="Shortest segment the cutter aims for (seconds).")
    max_segment_s: float = Field(29.5, gt=1, le=30, description="Longest segment, padding included (<= 30 s: Whisper's window).")
    pad_s: float = Field(0.2, ge=0, le=1, description="Silence kept each side of the speech (never into a neighbour).")
    max_pause_s: float = Field(3.0, gt=0, description="A pause this long always ends a segment.")
    threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability that starts speech.")
    min_speech_s: float = Field(0.25, ge=0, description="Speech regions shorter than this are dropped (clicks).")
    min_silence_s: float = Field(0.1, ge=0, description="Shortest silence that separates two speech regions.")

    @model_validator(mode="after")
    def _ordered(self) -> SegmentOptions:
        if self.min_segment_s >= self.max_segment_s:
            raise ValueError(f"min_segment_s ({self.min_segment_s}) must be below max_segment_s ({self.max_segment_s})")
        if 2 * self.pad_s >= self.max_segment_s:
            raise ValueError("pad_s leaves no room for speech within max_segment_s")
        return self

    def cutting(self) -> dict[str, Any]:
        """The options that change where cuts fall (not which files): part of the fingerprint."""
        return self.model_dump(exclude={"segment_over_s", "no_segment"})


class PipelineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AUDIO_PIPELINE_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    audio_root: str = Field(description="Local path or fsspec URL of the speaker folders.")
    results_root: str = Field(
        "results", description="Local path or fsspec URL for outputs (default: see results_base, else results)."
    )
    results_base: str | None = Field(
        None, description="When results_root is not given: results go to {results_base}/{name}-{hash} of the audio root."
    )
    service_url: str = Field("http://localhost:8000", description="Whisper service base URL.")
    service_token: SecretStr | None = Field(None, description="Bearer token for the service.")
    tokenizer: str = Field("rpq", description="Tokeniser name: rpq, simulated, encodec.")
    tokenizer_options: dict[str, Any] = Field(default_factory=dict, description="Tokeniser options.")
    tokenizer_device: str = Field("auto", description="auto, cpu or cuda.")
    language: str | None = Field(None, description="Force a transcription language.")
    batch_size: int = Field(32, ge=1, le=4096, description="Files per batch (one engine call).")
    shard_max_files: int = Field(1024, ge=1, description="Most files one task works through.")
    merge_max_tasks: int = Field(64, ge=1, description="Most merge tasks per run.")
    # NoDecode: AUDIO_PIPELINE_EXTENSIONS=.flac,.wav reaches the validator as text, not as JSON.
    extensions: Annotated[tuple[str, ...], NoDecode] = Field(DEFAULT_EXTENSIONS, description="Audio file suffixes.")
    dask_address: str | None = Field(None, description="Existing Dask scheduler address.")
    n_workers: int | None = Field(None, ge=1, description="Local Dask workers (CPU only).")
    threads_per_worker: int = Field(4, ge=1, description="Threads per Dask worker.")
    no_workers_timeout_s: float = Field(
        600.0, gt=0, description="Give up (files reported failed) when the cluster has had no workers this long."
    )
    http_concurrency: int = Field(8, ge=1, le=256, description="Requests in flight per task.")
    http_timeout_s: float = Field(300.0, gt=0, description="Per-request read timeout.")
    http_retries: int = Field(3, ge=0, le=20, description="Retries on 5xx/connection errors.")
    http_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each try.")
    service_wait_s: float = Field(60.0, ge=0, description="How long to wait for a loading service.")
    show_progress: bool = Field(False, description="Draw a terminal progress bar (the CLI sets it).")
    prefect_server: Literal["keep", "temporary"] = Field(
        "keep", description="CLI runs with no Prefect API configured: keep the local server for the next run "
        "(it stops after prefect_server_idle_s without a request), or start and stop one per run.",
    )
    prefect_server_idle_s: float = Field(600.0, gt=0, description="A kept local Prefect server stops after this idle time.")
    with_quality: bool = Field(False, description="Add a `quality` object to each JSONL line.")
    drop_flagged: bool = Field(
        False, description="Move clips with quality flags from the JSONL to `{folder}.errors.jsonl` (stage quality)."
    )
    verify_content: bool = Field(
        False, description="Add each audio file's sha256 to its identity (reads every file each run): for files "
        "rewritten in place with their size and mtime preserved.",
    )
    max_failed_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Failed files (fraction of all) a run may have and still count as Completed."
    )
    # NoDecode: a comma list (or JSON) like extensions.
    export_formats: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Formats to export the results into at the end of each run: lhotse, hf, webdataset, nemo."
    )
    export_root: str | None = Field(
        None, description="Local directory for end-of-run exports, one folder per format (default: RESULTS-exports)."
    )
    segmentation: SegmentOptions = Field(
        default_factory=SegmentOptions, description="Long recordings: which are cut into segments, and how."
    )
    # NoDecode: a comma list (or JSON) like extensions. Empty: any root may be read (CLI use).
    allowed_roots: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Roots (paths or URL prefixes) a run may read audio from and write results to; empty: any."
    )

    @model_validator(mode="before")
    @classmethod
    def _results_root_by_rule(cls, data: Any) -> Any:
        """No results_root given (argument or AUDIO_PIPELINE_RESULTS_ROOT) but a results_base: the rule decides."""
        if isinstance(data, dict) and data.get("results_base") and not data.get("results_root") and data.get("audio_root"):
            data = {**data, "results_root": results_root_for(str(data["audio_root"]), str(data["results_base"]))}
        return data

    @field_validator("extensions", mode="before")
    @classmethod
    def _normalise_extensions(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        exts = tuple(
            (e if e.startswith(".") else f".{e}").lower() for e in (v.strip() for v in value) if e
        )
        if not exts:
            raise ValueError("at least one audio extension is needed")
        return exts

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        return tuple(v.strip().rstrip("/") or v.strip() for v in value if v and v.strip())

    @field_validator("export_formats", mode="before")
    @classmethod
    def _known_formats(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        formats = tuple(dict.fromkeys(v.strip().lower() for v in value if v and v.strip()))
        unknown = [f for f in formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(EXPORT_FORMATS)}")
        return formats

    def export_dir(self) -> str:
        """Where end-of-run exports go: `export_root`, else beside a local results root (never
        inside it: tools that glob the results for `*.jsonl` would pick the exports up)."""
        if self.export_root:
            return self.export_root
        if "://" in self.results_root:
            return "exports"
        return f"{self.results_root.rstrip('/') or '.'}-exports"

    @field_validator("audio_root", "results_root")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        stripped = value.rstrip("/")
        return stripped or value

    def tokenizer_fingerprint(self) -> dict[str, Any]:
        return {"name": self.tokenizer, **self.tokenizer_options}


def results_root_for(audio_root: str, results_base: str) -> str:
    """The results root of `audio_root` under `results_base`: `{base}/{name}-{hash}`.

    One deployment serves many audio roots, and one results root belongs to one audio root
    (`_owner.json`), so each audio root gets its own folder, derived from its resolved path
    (symlinks and `..` followed, as the owner check compares them): `name` is its last two path
    segments made safe (`[A-Za-z0-9._-]`, readable), `hash` the first 12 hex digits of the
    SHA-256 of the whole resolved path (two roots with the same name never share a folder).
    The same root always maps to the same folder; a moved root gets a new one.

    Raises:
        ValueError: the audio root's location cannot be resolved (unknown URL protocol).
    """
    from tasks.access import canonical_root  # tasks.access imports this module

    try:
        canonical = canonical_root(audio_root)
    except (ValueError, ImportError, OSError) as e:
        raise ValueError(f"cannot derive a results root from audio root {audio_root!r}: {e}") from e
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    segments = [s for s in canonical.split("://", 1)[-1].split("/") if s][-2:]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(segments)).strip("._-")[:60] or "root"
    return f"{results_base.rstrip('/') or results_base}/{name}-{digest}"

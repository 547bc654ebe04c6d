"""`results/manifest.json`: what produced the JSONL and what its `token_array` means.

Rewritten atomically at the end of every run, so the results root always describes itself: the
transcription model and decode options (from the service's `/healthz`), the tokeniser with its
rate, vocabulary and codebook layout, the audio root the ids are relative to, and counts. Exports
copy it, so a dataset separated from its run still says how to read its tokens.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.records import RunSummary
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenisers.specs import TokenSpec, describe_tokens

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


class _Part(BaseModel):
    # extra="ignore": a manifest written by a newer version still reads here (schema_version says more).
    model_config = ConfigDict(frozen=True, extra="ignore")


class ServiceInfo(_Part):
    """The transcription side, as the service's `/healthz` named it (older services name less)."""

    url: str
    engine: str | None = None  # "openai-whisper" | "faster-whisper"
    model: str | None = None
    device: str | None = None
    weights_sha256: str | None = None
    decode: dict[str, Any] | None = None  # decode options (beam, temperatures, thresholds, ...)
    fingerprint: str | None = None  # covers engine + weights hash + decode options
    language: str | None = None  # the language the run requested; None: detected per clip


class Counts(_Part):
    folders: int
    files: int
    lines: int
    failed: int
    flagged: int
    new: int


class OutputInfo(_Part):
    """How the lines are laid out on the results root."""

    jsonl: str = "{folder}.jsonl"
    errors_jsonl: str = "{folder}.errors.jsonl"
    fields: list[str]  # keys of every line
    with_quality: bool
    drop_flagged: bool


class SegmentationInfo(_Part):
    """How long recordings became lines (issue 22): files over `segment_over_s` are cut by Silero VAD;
    each segment's line has id `{source_id}#t={start:.3f},{end:.3f}` plus `source_id`, `start`, `end`."""

    enabled: bool  # False: --no-segment, every file is one line however long
    segment_over_s: float
    options: dict[str, Any]  # min/max segment length, padding, pause and VAD thresholds
    fingerprint: str  # VAD model sha256 + options: segment lists are reused only under the same one
    vad_model: str = "silero_vad_v6 (faster-whisper's wheel)"
    line_id: str = "{source_id}#t={start:.3f},{end:.3f}"
    segment_fields: list[str] = ["id", "source_id", "start", "end", "transcription", "token_array"]


class Manifest(_Part):
    schema_version: int = SCHEMA_VERSION
    kind: Literal["audio-pipeline-results"] = "audio-pipeline-results"
    written_at: str  # ISO 8601, UTC
    run_id: str | None  # the Prefect flow run that wrote it; None outside Prefect
    audio_root: str  # line ids are paths relative to it (absolute for a local root)
    results_root: str
    service: ServiceInfo
    tokeniser: TokenSpec
    output: OutputInfo
    counts: Counts
    segmentation: SegmentationInfo | None = None  # None in manifests older than issue 22

    def audio_path(self, file_id: str) -> str:
        """Where the audio of line `file_id` lives (a local path or an fsspec URL)."""
        return f"{self.audio_root.rstrip('/')}/{file_id}"


def build_manifest(
    *, settings: PipelineSettings, health: dict, summary: RunSummary, run_id: str | None,
    tokenizer_settings: dict[str, Any],
) -> Manifest:
    """The manifest for a finished run (see `write_manifest`)."""
    fields = ["id", "transcription", "token_array"] + (["quality"] if settings.with_quality else [])
    return Manifest(
        written_at=datetime.now(UTC).isoformat(timespec="seconds"),
        run_id=run_id,
        audio_root=_absolute(settings.audio_root),
        results_root=_absolute(settings.results_root),
        service=ServiceInfo(
            url=settings.service_url, engine=health.get("engine"), model=health.get("model"),
            device=health.get("device"), weights_sha256=health.get("weights_sha256"),
            decode=health.get("decode"), fingerprint=health.get("fingerprint"), language=settings.language,
        ),
        tokeniser=describe_tokens(tokenizer_settings),
        output=OutputInfo(fields=fields, with_quality=settings.with_quality, drop_flagged=settings.drop_flagged),
        counts=Counts(
            folders=summary.folders, files=summary.files, lines=summary.lines, failed=summary.failed,
            flagged=summary.flagged, new=summary.new,
        ),
        segmentation=segmentation_info(settings),
    )


def segmentation_info(settings: PipelineSettings) -> SegmentationInfo:
    from tasks.segments import segmentation_fingerprint

    options = settings.segmentation
    return SegmentationInfo(
        enabled=not options.no_segment, segment_over_s=options.segment_over_s, options=options.cutting(),
        fingerprint=segmentation_fingerprint(options),
    )


def write_manifest(
    results_root: str, *, settings: PipelineSettings, health: dict, summary: RunSummary, run_id: str | None,
    tokenizer_settings: dict[str, Any],
) -> str:
    """Write `results_root/manifest.json` atomically; returns the path a user can open.

    Args:
        health: the service's `/healthz` body (fields an older service lacks stay null).
        tokenizer_settings: this run's tokeniser provenance settings (the flow's
            `expect.tokenizer_settings`). Required: merge joins only lines whose tokens match
            them, so they describe every line; a guess from what is on disk could describe
            stale tokens instead.

    Raises:
        ValueError: settings of a tokeniser `specs.describe_tokens` does not know.
    """
    manifest = build_manifest(
        settings=settings, health=health, summary=summary, run_id=run_id, tokenizer_settings=tokenizer_settings
    )
    store = Store(results_root)
    store.write_bytes(MANIFEST_NAME, (manifest.model_dump_json(indent=2) + "\n").encode())
    return store.display(MANIFEST_NAME)


def read_manifest(results_root: str) -> Manifest | None:
    """The manifest of a results root; None when there is none (results older than manifests).

    Raises:
        ValueError: a manifest that exists but is not valid JSON of this schema, naming the file.
    """
    store = Store(results_root)
    data = store.read_bytes(MANIFEST_NAME)
    if data is None:
        return None
    try:
        return Manifest.model_validate(json.loads(data))
    except (ValueError, ValidationError) as e:
        raise ValueError(f"{store.display(MANIFEST_NAME)} is not a valid manifest: {e}") from e


def _absolute(root: str) -> str:
    """A relative local root is relative to the run's working directory: pin it."""
    return root if "://" in root else os.path.abspath(root)

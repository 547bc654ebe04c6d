"""What the Prefect UI shows of a run: a folder table, sample lines, plots, a run report, progress.

The number of artifacts is bounded whatever the corpus size: one folder table (110 VCTK folders
are 110 rows, not 110 cards), sample tables for at most a few changed folders, one table of the
worst flagged clips across all folders (only when a clip is flagged), two images and one report.
Everything is read back from the results root (the JSONL as written, the intermediates beside
it), so the UI shows what a user downloads. Publishing never fails a run whose results are
written: a part that cannot be published is logged with its traceback and skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import fsspec
import soundfile
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from flows.plots import Panel, data_url, histogram_png
from tasks.export.reader import flat_quality
from tasks.merge import WORST_CLIPS, jsonl_name
from tasks.records import FolderReport, Tokens, Transcription, source_id
from tasks.storage import Store

FOLDERS_KEY, RUN_REPORT_KEY, PROGRESS_KEY = "folders", "run-report", "progress"
WORST_KEY = "worst-flagged-clips"
WORST_ROWS = 50  # rows of the run-level table of flagged clips, whatever the number of folders
DURATIONS_KEY, QUALITY_KEY = "clip-durations", "clip-quality"
SEGMENTS_KEY = "segment-durations"  # long recordings cut into segments (issue 22)
REPORT_DIR = "_report"  # beside the folders' JSONL: holds no .jsonl, so no folder is mistaken for it
TEXT_CHARS = 160  # of a transcription in a table cell
# Quality fields plotted when present: (field, title, x-axis unit).
QUALITY_PANELS = (
    ("avg_logprob", "Decode confidence (avg_logprob)", "mean log-probability per token"),
    ("compression_ratio", "Compression ratio", "gzip ratio of the text"),
    ("snr_db", "SNR (WADA estimate)", "dB"),
    ("words_per_second", "Speaking rate", "words per second"),
)


class Clip(BaseModel):
    """One JSONL line as the UI shows it: its text and size, plus quality fields where known."""

    model_config = ConfigDict(frozen=True)

    id: str
    text: str
    tokens: int
    duration: float | None = None
    has_quality: bool = False  # the line or its intermediates carried quality fields
    flags: list[str] = Field(default_factory=list)
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    snr_db: float | None = None
    words_per_second: float | None = None


class Plot(BaseModel):
    """One published image: where its PNG is kept and how the UI shows it."""

    model_config = ConfigDict(frozen=True)

    key: str
    title: str
    path: str  # the PNG on the results root (a local path or a URL with its protocol)
    url: str  # what the UI loads: a data URL of the same PNG
    artifact: UUID


class Progress(BaseModel):
    """A run's progress artifact and the run that shows it; small, so it can be a subflow parameter."""

    model_config = ConfigDict(frozen=True)

    artifact: UUID
    total: int
    unit: str = "shards"
    flow_run_id: UUID | None = None  # the run whose Logs tab gets the progress lines
    flow_run_name: str | None = None
    flow_name: str | None = None


class RunArtifacts(BaseModel):
    """What `publish_run_artifacts` created."""

    folders: UUID | None = None
    samples: dict[str, UUID] = Field(default_factory=dict)  # folder -> its sample table
    plots: list[Plot] = Field(default_factory=list)
    worst: UUID | None = None  # the worst flagged clips across folders; None when nothing is flagged
    report: UUID | None = None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:100] or "root"


# -- the one call at the end of a run ------------------------------------------------------------
def publish_run_artifacts(
    reports: Sequence[FolderReport],
    results_root: str,
    *,
    wall_seconds: float,
    audio_root: str | None = None,
    exports: Sequence[tuple[str, str]] = (),
    stale_folders: Sequence[str] = (),
    lines_per_folder: int = 5,
    errors_per_folder: int = 20,
    max_sample_tables: int = 10,
    max_plot_clips: int = 2000,
    max_worst_rows: int = WORST_ROWS,
) -> RunArtifacts:
    """Publish the folder table, sample tables, plots, worst flagged clips and run report on the current flow run.

    `exports` are (format, path) pairs of exports this run wrote; `audio_root` lets a line whose
    intermediates are gone still show its duration (read from the audio file's header).
    """
    store = Store(results_root)
    out = RunArtifacts()
    with _guard("the folder table"):
        out.folders = publish_folder_table(reports)
    with _guard("the sample tables"):
        out.samples = publish_samples(
            reports, store, audio_root=audio_root, lines_per_folder=lines_per_folder,
            errors_per_folder=errors_per_folder, max_tables=max_sample_tables,
        )
    with _guard("the plots"):
        clips = plot_clips(reports, store, audio_root=audio_root, max_clips=max_plot_clips)
        out.plots = publish_plots(clips, store, sampled_from=sum(r.lines for r in reports))
    with _guard("the segment durations"):
        out.plots += publish_segment_plot(reports, store)
    worst_shown = 0
    with _guard("the worst flagged clips"):
        rows = worst_rows(reports, store, limit=max_worst_rows)
        if rows:
            out.worst = publish_worst_table(reports, rows)
            worst_shown = len(rows)
    with _guard("the run report"):
        out.report = create_markdown_artifact(
            key=RUN_REPORT_KEY,
            markdown=run_report_markdown(
                reports, store, wall_seconds, audio_root, exports, stale_folders, out.plots, worst_shown=worst_shown,
            ),
            description=_counts_line(reports, wall_seconds),
        )
    return out


# -- 1. one table of every folder ----------------------------------------------------------------
def folder_rows(reports: Sequence[FolderReport]) -> list[dict[str, Any]]:
    """One row per folder; reused = files neither produced anew by this run nor failed."""
    rows = []
    for r in sorted(reports, key=lambda r: r.folder):
        failed = len({source_id(e.id) for e in r.errors})  # files: a long one with failed segments, once
        rows.append({
            "folder": r.folder, "files": r.files, "new": r.new, "reused": max(0, r.files - r.new - failed),
            "lines": r.lines, "failed": failed, "flagged": r.flagged,
            "changed": "yes" if r.changed else "no", "jsonl": r.jsonl,
        })
        if any(x.segments for x in reports):  # long recordings were cut: say how much (issue 22)
            rows[-1].update(segments=r.segments, segmented_hours=round(r.segment_seconds / 3600, 4))
    return rows


def publish_folder_table(reports: Sequence[FolderReport], key: str = FOLDERS_KEY) -> UUID:
    rows = folder_rows(reports)
    changed = sum(r.changed for r in reports)
    return create_table_artifact(
        key=key, table=rows,
        description=f"{len(rows)} folders, {changed} rewritten by this run; errors in each `{{folder}}.errors.jsonl`",
    )


# -- 2. sample lines and errors of the folders this run changed ----------------------------------
def sample_folders(reports: Sequence[FolderReport], max_tables: int) -> list[FolderReport]:
    """The changed folders worth a table: those with errors or flagged lines first, then by name."""
    changed = [r for r in reports if r.changed]
    changed.sort(key=lambda r: (not (r.errors or r.flagged), r.folder))
    return changed[:max_tables]


def publish_samples(
    reports: Sequence[FolderReport], store: Store, *, audio_root: str | None = None,
    lines_per_folder: int = 5, errors_per_folder: int = 20, max_tables: int = 10,
) -> dict[str, UUID]:
    """A table per changed folder (at most `max_tables`): its first lines, then its first errors."""
    published = {}
    chosen = sample_folders(reports, max_tables)
    changed = sum(r.changed for r in reports)
    for report in chosen:
        try:
            clips = [clip_of(line, store, audio_root) for line in head_lines(store, report.folder, lines_per_folder)]
        except ValueError as e:
            _logger().warning("no sample table for folder %s: %s", report.folder, e)
            continue
        rows = sample_rows(clips, report, errors_per_folder)
        if not rows:
            continue
        shown = f"first {len(clips)} of {report.lines} lines"
        if report.errors:
            shown += f", first {min(len(report.errors), errors_per_folder)} of {len(report.errors)} errors"
        more = f"; {changed - len(chosen)} more changed folders not shown" if changed > len(chosen) else ""
        published[report.folder] = create_table_artifact(
            key=artifact_key("samples", report.folder), table=rows,
            description=f"{report.folder}: {shown} ({report.jsonl}){more}",
        )
    return published


def sample_rows(clips: Sequence[Clip], report: FolderReport, max_errors: int) -> list[dict[str, Any]]:
    """Lines, then errors, in the same columns (the UI takes its columns from the rows).

    `status` says which a row is; a failed row's text is why it failed, so the message sits in the
    wide column instead of one more column past the right edge.
    """
    with_flags = any(c.has_quality for c in clips)
    rows = []
    for c in clips:
        row = {"id": c.id, "status": "flagged" if c.flags else "ok", "duration_s": _round(c.duration, 2),
               "tokens": c.tokens}
        if with_flags:
            row["flags"] = ", ".join(c.flags) or "none"  # not "-": the UI renders cells as markdown (a bullet)
        rows.append({**row, "text": _cut(c.text)})
    for e in report.errors[:max_errors]:
        row = {"id": e.id, "status": f"failed: {e.stage}", "duration_s": "", "tokens": ""}
        if with_flags:
            row["flags"] = ""
        rows.append({**row, "text": _cut(e.error)})
    return rows


def head_lines(store: Store, folder: str, n: int) -> list[dict[str, Any]]:
    """The first `n` lines of a folder's JSONL, read without loading the rest of the file.

    Raises ValueError naming the file and line when a line is not a JSON object with an `id`.
    """
    lines: list[dict[str, Any]] = []
    path = store.path(jsonl_name(folder))
    try:
        with store.fs.open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if len(lines) >= n:
                    break
                if not raw.strip():
                    continue
                try:
                    line = json.loads(raw)
                except ValueError as e:
                    raise ValueError(f"{store.display(jsonl_name(folder))} line {number} is not JSON ({e})") from None
                if not isinstance(line, dict) or not isinstance(line.get("id"), str):
                    raise ValueError(f"{store.display(jsonl_name(folder))} line {number} has no string `id`")
                lines.append(line)
    except FileNotFoundError:
        pass
    return lines


def clip_of(line: dict[str, Any], store: Store, audio_root: str | None = None) -> Clip:
    """A line's clip: quality from the line when written with --with-quality, else the intermediates."""
    quality = flat_quality(line.get("quality"))
    fields: dict[str, Any] = {k: quality.get(k) for k in ("duration", *(p[0] for p in QUALITY_PANELS))}
    flags = quality.get("flags")
    has_quality = bool(quality)
    if fields["duration"] is None or not has_quality:
        transcription = store.read_transcription(line["id"])
        if isinstance(transcription, Transcription):
            fields["duration"] = fields["duration"] if fields["duration"] is not None else transcription.duration
            if transcription.quality is not None:
                has_quality = True
                tq = transcription.quality
                for name in ("avg_logprob", "compression_ratio", "words_per_second"):
                    fields[name] = fields[name] if fields[name] is not None else getattr(tq, name)
                flags = flags if flags is not None else list(tq.flags)
    if has_quality and fields["snr_db"] is None and "snr_db" not in quality:
        tokens = store.read_tokens(line["id"])
        if isinstance(tokens, Tokens) and tokens.audio is not None:
            fields["snr_db"] = tokens.audio.snr_db
    if fields["duration"] is None and audio_root:
        fields["duration"] = _audio_duration(audio_root, line["id"])
    return Clip(
        id=line["id"], text=line.get("transcription", ""), tokens=len(line.get("token_array") or ()),
        has_quality=has_quality, flags=list(flags or ()), **{k: _number(v) for k, v in fields.items()},
    )


# -- 3. the worst flagged clips of the whole run -------------------------------------------------
def worst_rows(
    reports: Sequence[FolderReport], store: Store, *, limit: int = WORST_ROWS, max_lookups: int = 2000
) -> list[dict[str, Any]]:
    """The `limit` worst flagged clips across folders, in the order merge ranks them within one.

    Merge keeps the few worst of each folder (`FolderReport.worst`: id, flags, text) ranked by
    most flags, then highest compression ratio, then lowest avg_logprob, then id. Ranking them
    across folders needs the two scores: taken from the entry when it has them, else from the
    clip's transcription intermediate, read only for the entries that can still make the table
    (at most `max_lookups`; past that a clip ranks as merge ranks one without quality fields).
    """
    entries = [(r.folder, clip) for r in sorted(reports, key=lambda r: r.folder) for clip in r.worst]
    if not entries or limit <= 0:
        return []
    entries.sort(key=lambda e: -len(e[1].get("flags") or ()))
    if len(entries) > limit:  # fewer flags than the limit-th entry: out of the table whatever the scores
        least = len(entries[limit - 1][1].get("flags") or ())
        entries = [e for e in entries if len(e[1].get("flags") or ()) >= least]
    missing = [clip["id"] for _, clip in entries if not {"compression_ratio", "avg_logprob"} <= clip.keys()]
    if len(missing) > max_lookups:
        _logger().warning("worst flagged clips: %d clips to rank, scores read for the first %d only",
                          len(missing), max_lookups)
    scores = _transcript_scores(store, missing[:max_lookups])
    rows = []
    for folder, clip in entries:
        known = scores.get(clip["id"], {})
        ratio, logprob = (_number(clip.get(k, known.get(k))) for k in ("compression_ratio", "avg_logprob"))
        flags = list(clip.get("flags") or ())
        rows.append(((-len(flags), -(ratio or 0.0), logprob or 0.0, clip["id"]), {
            "folder": folder, "id": clip["id"], "flags": ", ".join(flags),
            "compression_ratio": _round(ratio, 2), "avg_logprob": _round(logprob, 3),
            "text": _cut(str(clip.get("text", ""))),
        }))
    rows.sort(key=lambda row: row[0])
    return [row for _, row in rows[:limit]]


def publish_worst_table(reports: Sequence[FolderReport], rows: Sequence[dict[str, Any]], key: str = WORST_KEY) -> UUID:
    flagged = sum(r.flagged for r in reports)
    folders = sum(bool(r.flagged) for r in reports)
    return create_table_artifact(
        key=key, table=list(rows),
        description=(f"the {len(rows)} worst of {flagged:,} flagged clips in {folders:,} folders "
                     f"(merge keeps the {WORST_CLIPS} worst of each folder): most flags, then highest "
                     f"compression ratio, then lowest avg_logprob"),
    )


def _transcript_scores(store: Store, ids: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """compression_ratio and avg_logprob of each clip whose transcription intermediate has them."""

    def read(file_id: str) -> dict[str, float | None]:
        t = store.read_transcription(file_id)
        if not isinstance(t, Transcription) or t.quality is None:
            return {}
        return {"compression_ratio": t.quality.compression_ratio, "avg_logprob": t.quality.avg_logprob}

    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores: one round trip per read
        return dict(zip(ids, pool.map(read, ids)))


# -- 4. plots and the run report ---------------------------------------------------------------
def plot_clips(
    reports: Sequence[FolderReport], store: Store, *, audio_root: str | None = None, max_clips: int = 2000
) -> list[Clip]:
    """A bounded sample of the corpus: the first lines of every folder, `max_clips` in all.

    Read from the head of each JSONL, so a triggered run over a large corpus costs a few reads
    per folder, not a pass over every line.
    """
    folders = [r for r in reports if r.lines]
    if not folders or max_clips <= 0:
        return []
    per_folder = max(1, max_clips // len(folders))

    def read(report: FolderReport) -> list[Clip] | str:
        try:
            return [clip_of(line, store, audio_root) for line in head_lines(store, report.folder, per_folder)]
        except ValueError as e:
            return str(e)  # logged below: the run logger lives in this thread's context, not the pool's

    clips: list[Clip] = []
    with ThreadPoolExecutor(max_workers=8) as pool:  # object stores: one round trip per read
        for report, read_back in zip(folders, pool.map(read, folders)):
            if isinstance(read_back, str):
                _logger().warning("folder %s left out of the plots: %s", report.folder, read_back)
            else:
                clips.extend(read_back)
    return clips[:max_clips]


def publish_plots(clips: Sequence[Clip], store: Store, sampled_from: int) -> list[Plot]:
    """Histograms of durations and quality fields, written to `_report/` and shown inline.

    The artifact's URL is a data URL: a browser cannot fetch a path on the results root from the
    UI's page, but it renders an inlined PNG anywhere; the stored PNG is the copy to keep.
    """
    note = f"{len(clips):,} clips sampled from the first lines of each folder ({sampled_from:,} lines in all)"
    durations = [c.duration for c in clips if c.duration is not None]
    quality = [Panel(title, unit, [getattr(c, name) for c in clips if getattr(c, name) is not None])
               for name, title, unit in QUALITY_PANELS]
    plots = []
    for key, name, panels, columns, title in (
        (DURATIONS_KEY, "durations.png", [Panel("Clip duration", "seconds", durations)], 1, "Clip durations"),
        (QUALITY_KEY, "quality.png", quality, 2, "Quality distributions"),
    ):
        if not any(p.values for p in panels):
            continue  # e.g. no quality fields: a run without them gets no empty picture
        png = histogram_png(panels, columns=columns, note=note)
        relative = f"{REPORT_DIR}/{name}"
        store.write_bytes(relative, png)
        path, url = store.display(relative), data_url(png)
        artifact = create_image_artifact(image_url=url, key=key, description=f"{title} ({note}); PNG at {path}")
        plots.append(Plot(key=key, title=title, path=path, url=url, artifact=artifact))
    return plots


def segment_panel(reports: Sequence[FolderReport]) -> Panel | None:
    """Durations of the segments long recordings were cut into (a bounded sample per folder)."""
    values = [d for r in reports for d in r.segment_durations]
    return Panel("Segment duration", "seconds", values) if values else None


def publish_segment_plot(reports: Sequence[FolderReport], store: Store) -> list[Plot]:
    """A histogram of segment durations, beside the clip plots; none when nothing was segmented."""
    panel = segment_panel(reports)
    if panel is None:
        return []
    note = f"{len(panel.values):,} of {sum(r.segments for r in reports):,} segments"
    png = histogram_png([panel], columns=1, note=note)
    relative = f"{REPORT_DIR}/segments.png"
    store.write_bytes(relative, png)
    path, url = store.display(relative), data_url(png)
    title = "Segment durations"
    artifact = create_image_artifact(image_url=url, key=SEGMENTS_KEY, description=f"{title} ({note}); PNG at {path}")
    return [Plot(key=SEGMENTS_KEY, title=title, path=path, url=url, artifact=artifact)]


def run_report_markdown(
    reports: Sequence[FolderReport], store: Store, wall_seconds: float, audio_root: str | None,
    exports: Sequence[tuple[str, str]], stale_folders: Sequence[str], plots: Sequence[Plot] = (),
    max_errors: int = 20, worst_shown: int = 0,
) -> str:
    """Counts with new, reused and failed apart, throughput over the new work, locations, plots inline."""
    c = _counts(reports)
    root = store.display("").rstrip("/")
    rate = (f"**{c['new'] / wall_seconds:.2f} files/s** over the {c['new']:,} files this run produced "
            f"({wall_seconds:.1f} s wall)") if c["new"] and wall_seconds > 0 else (
        f"nothing new to produce ({wall_seconds:.1f} s wall)")
    md = [
        "# Run report", "",
        "| files | new | reused | failed | flagged | lines | folders | changed folders | audio hours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {c['files']:,} | {c['new']:,} | {c['reused']:,} | {c['failed']:,} | {c['flagged']:,} | {c['lines']:,} "
        f"| {c['folders']:,} | {c['changed']:,} | {c['audio_hours']:.3f} |", "",
        f"- throughput: {rate}",
        f"- results: `{root}` (one `{{folder}}.jsonl` per folder, failures in `{{folder}}.errors.jsonl`, "
        f"intermediates under `transcriptions/` and `tokens/`)",
    ]
    if c["flagged"]:
        in_folders = sum(bool(r.flagged) for r in reports)
        line = (f"- flagged: **{c['flagged']:,} clip(s)** in {in_folders:,} folder(s) "
                f"(per folder in the `{FOLDERS_KEY}` table)")
        if worst_shown:
            line += f"; the {worst_shown} worst are in the table `{WORST_KEY}` (id, flags, scores, text)"
        md.append(line)
    if segments := sum(r.segments for r in reports):
        hours = sum(r.segment_seconds for r in reports) / 3600
        md.append(f"- segments: **{segments:,} lines are segments of long recordings** ({hours:.3f} segmented hours; "
                  f"ids `source#t=start,end`, per folder in the `{FOLDERS_KEY}` table)")
    if audio_root:
        md.append(f"- audio: `{audio_root}`")
    for plot in plots:
        md.append(f"- {plot.title.lower()}: `{plot.path}`")
    if exports:
        md += ["", "## Exports", "", "| format | location |", "|---|---|"]
        md += [f"| {fmt} | {_link(path)} |" for fmt, path in exports]
    if stale_folders:
        md += ["", f"**{len(stale_folders)} folder(s) have results but no audio any more** (kept): "
               + ", ".join(f"`{f}`" for f in stale_folders[:20])]
    removed = sum(r.removed for r in reports)
    if removed:
        shown = [x for r in sorted(reports, key=lambda r: r.folder) for x in r.removed_ids][:max_errors]
        md += ["", f"## Removed: {removed:,} line(s) of earlier runs (first {len(shown)})", "",
               "| id | why |", "|---|---|"]
        md += [f"| {_cell(x.id)} | {_cell(_cut(x.reason))} |" for x in shown]
    kept = sum(r.kept for r in reports)
    if kept:
        md += ["", f"- kept: {kept:,} line(s) of files this run did not list (still on the audio root, still valid)"]
    errors = [e for r in sorted(reports, key=lambda r: r.folder) for e in r.errors]
    if errors:
        md += ["", f"## Errors (first {min(max_errors, len(errors))} of {len(errors)})", "",
               "| id | stage | error |", "|---|---|---|"]
        md += [f"| {_cell(e.id)} | {e.stage} | {_cell(_cut(e.error))} |" for e in errors[:max_errors]]
    for plot in plots:  # the UI's markdown renders data-URL images: counts and pictures on one page
        md += ["", f"## {plot.title}", "", f"![{plot.title}]({plot.url})"]
    return "\n".join(md) + "\n"


# -- 5. progress without a click -----------------------------------------------------------------
def start_progress(total: int, unit: str = "shards", key: str = PROGRESS_KEY) -> Progress:
    """The run's progress artifact, saying `0/total` (call in the run users open, before any work)."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    progress = Progress(
        artifact=create_progress_artifact(
            progress=0.0 if total else 100.0, key=key, description=f"{unit} 0/{total} done",
        ),
        total=total, unit=unit, flow_run_id=run.id if run else None, flow_run_name=run.name if run else None,
        flow_name=context.flow.name if context and context.flow else None,
    )
    _progress_logger(progress).info("%s 0/%d done", unit, total)
    return progress


def report_progress(
    progress: Progress, done: int, files_done: int | None = None, files_total: int | None = None
) -> None:
    """Log "shards done/total" and put it on the progress artifact; call as each one finishes.

    The line goes to the run that started the progress even when called from a subflow, so the
    Logs tab users open (and `prefect deployment run --watch`) shows it. Large runs log every 5%
    (and the last one): a 4,000-shard run writes ~20 lines, not 4,000.
    """
    total = progress.total
    text = f"{progress.unit} {done}/{total} done"
    if files_total:
        text += f" ({files_done or 0:,}/{files_total:,} files)"
    last = done >= total
    if total <= 40 or last or done * 20 // total != (done - 1) * 20 // total:
        _progress_logger(progress).info(text)
    if total <= 200 or last or done * 100 // total != (done - 1) * 100 // total:
        update_progress_artifact(
            progress.artifact, progress=100.0 * done / total if total else 100.0, description=text,
        )


def _progress_logger(progress: Progress) -> logging.Logger | logging.LoggerAdapter:
    if progress.flow_run_id is None:
        return _logger()
    # Prefect's API log handler sends a record to the run named in it, whatever run is current.
    return logging.LoggerAdapter(logging.getLogger("prefect.flow_runs"), {
        "flow_run_id": str(progress.flow_run_id), "flow_run_name": progress.flow_run_name,
        "flow_name": progress.flow_name,
    })


# -- helpers ---------------------------------------------------------------------------------------
def _counts(reports: Sequence[FolderReport]) -> dict[str, Any]:
    rows = folder_rows(reports)
    total = {k: sum(r[k] for r in rows) for k in ("files", "new", "reused", "failed", "flagged", "lines")}
    return {**total, "folders": len(rows), "changed": sum(r.changed for r in reports),
            "audio_hours": sum(r.audio_seconds for r in reports) / 3600}


def _counts_line(reports: Sequence[FolderReport], wall_seconds: float) -> str:
    c = _counts(reports)
    rate = f", {c['new'] / wall_seconds:.2f} new files/s" if c["new"] and wall_seconds > 0 else ""
    return (f"{c['files']:,} files: {c['new']:,} new, {c['reused']:,} reused, {c['failed']:,} failed, "
            f"{c['flagged']:,} flagged{rate}")


def _audio_duration(audio_root: str, file_id: str) -> float | None:
    """From the file's header (soundfile reads only what it needs); None if unreadable."""
    try:
        with fsspec.open(f"{audio_root.rstrip('/')}/{file_id}", "rb") as f:
            return soundfile.info(f).duration
    except (OSError, RuntimeError, soundfile.LibsndfileError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


def _cut(text: str, limit: int = TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _link(path: str) -> str:
    return f"[{path}]({path})" if path.startswith(("http://", "https://")) else f"`{path}`"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow run (a script, a test of the helpers)
        return logging.getLogger("audio_pipeline.artifacts")


@contextlib.contextmanager
def _guard(what: str) -> Iterator[None]:
    """The results are written already: a UI part that fails is logged, not raised."""
    try:
        yield
    except Exception:
        _logger().warning("could not publish %s (the results are not affected)", what, exc_info=True)

"""The run's artifacts, published inside a real flow run and read back through the Prefect API.

The results root is written here by hand with the real records and Store: one folder written
with --with-quality, one without (quality and durations come from the intermediates) and with an
error, one unchanged folder whose intermediates are gone (duration from the FLAC header).
The worst flagged clips across folders have a corpus of their own (`ranked`).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
import soundfile
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import FlowRunContext
from prefect.logging.handlers import APILogHandler

from flows.artifacts import (
    Progress,
    clip_of,
    publish_run_artifacts,
    report_progress,
    start_progress,
)
from flows.plots import Panel, bins_of, histogram_png, nice_ticks
from tasks.records import (
    AudioQuality,
    FileError,
    FolderReport,
    OutputLine,
    QualityOutputLine,
    SourceInfo,
    Tokens,
    TranscriptQuality,
    Transcription,
)
from tasks.storage import Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE = SourceInfo(size=1, mtime="0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, list[FolderReport]]:
    root = tmp_path_factory.mktemp("artifacts")
    results, audio = root / "results", root / "audio"
    store = Store(str(results))
    # p225: written with --with-quality; the quality object nests transcript and audio groups.
    p225 = [
        QualityOutputLine(id=f"p225/p225_00{i}_mic2.flac", transcription=f"Please call Stella {i}.",
                          token_array=list(range(10 * i)),
                          quality={"duration": 1.5 * i, "flags": ["repetition"] if i == 2 else [],
                                   "transcript": {"avg_logprob": -0.1 * i, "compression_ratio": 1.1 * i,
                                                  "words_per_second": 2.0 + i},
                                   "audio": {"snr_db": 20.0 + i}})
        for i in (1, 2, 3)
    ]
    store.write_lines("p225.jsonl", p225)
    # p226: the three-field contract; quality lives in the intermediates only. One file failed.
    p226 = [OutputLine(id=f"p226/p226_00{i}_mic2.flac", transcription=f"Ask her {i} | things.",
                       token_array=[7] * (5 + i)) for i in (1, 2)]
    store.write_lines("p226.jsonl", p226)
    for i, line in enumerate(p226, start=1):
        store.write_record("transcriptions", Transcription(
            id=line.id, text=line.transcription, language="en", duration=2.25 * i, model="tiny.en",
            service_url="http://127.0.0.1:1", source=SOURCE,
            quality=TranscriptQuality(avg_logprob=-0.5, compression_ratio=2.0, words_per_second=3.0,
                                      flags=["low_confidence"] if i == 1 else []),
        ))
        store.write_record("tokens", Tokens(
            id=line.id, token_array=line.token_array, tokenizer="simulated", tokenizer_settings={}, source=SOURCE,
            audio=AudioQuality(sample_rate=16000, channels=1, rms_dbfs=-20.0, clipped_fraction=0.0,
                               silence_fraction=0.1, snr_db=12.5),
        ))
    error = FileError(id="p226/p226_009_mic2.flac", stage="transcribe", error="HTTP 400: not audio | bad header")
    # p227: an older run's line whose intermediates are gone; its FLAC is 0.75 s long.
    p227 = [OutputLine(id="p227/p227_001_mic2.flac", transcription="Old line.", token_array=[1, 2, 3])]
    store.write_lines("p227.jsonl", p227)
    (audio / "p227").mkdir(parents=True)
    soundfile.write(audio / "p227" / "p227_001_mic2.flac", np.zeros(12000, dtype="float32"), 16000)
    reports = [
        FolderReport(folder="p225", files=3, lines=3, new=3, flagged=1, jsonl=store.display("p225.jsonl"),
                     audio_seconds=9.0, worst=[{"id": "p225/p225_002_mic2.flac", "flags": ["repetition"],
                                                "text": "Please call Stella 2."}]),
        FolderReport(folder="p226", files=3, lines=2, new=1, errors=[error], jsonl=store.display("p226.jsonl"),
                     errors_jsonl=store.display("p226.errors.jsonl"), audio_seconds=6.75),
        FolderReport(folder="p227", files=1, lines=1, new=0, changed=False, jsonl=store.display("p227.jsonl"),
                     audio_seconds=0.75),
    ]
    return results, audio, reports


@flow(name="publish-artifacts-test")
def publish_flow(reports: list[FolderReport], results_root: str, audio_root: str) -> UUID:
    publish_run_artifacts(
        reports, results_root, wall_seconds=2.0, audio_root=audio_root,
        exports=[("lhotse", f"{results_root}/exports/lhotse"), ("hf", "https://example.org/ds")],
    )
    return FlowRunContext.get().flow_run.id


@flow(name="publish-worst-test")
def publish_worst_flow(reports: list[FolderReport], results_root: str, max_worst_rows: int) -> UUID:
    publish_run_artifacts(reports, results_root, wall_seconds=1.0, max_worst_rows=max_worst_rows)
    return FlowRunContext.get().flow_run.id


@flow(name="progress-shards")
def report_shards(progress: Progress) -> UUID:
    for done in range(1, progress.total + 1):
        report_progress(progress, done, files_done=10 * done, files_total=10 * progress.total)
    return FlowRunContext.get().flow_run.id


@flow(name="progress-test")
def progress_flow(total: int) -> tuple[UUID, UUID]:
    """Progress started by the run users open, reported from a subflow (as the pipeline does)."""
    progress = start_progress(total)
    return FlowRunContext.get().flow_run.id, report_shards(progress)


def artifacts_of(run_id: UUID) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found}


def logs_of(run_id: UUID) -> list[str]:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))]


@pytest.fixture(scope="module")
def published(prefect_harness, corpus) -> dict:
    results, audio, reports = corpus
    return artifacts_of(publish_flow(reports, str(results), str(audio)))


def test_a_bounded_set_of_artifacts_hangs_off_the_run(published):
    # Unchanged p227 gets no sample table; one folder table, two plots and one report whatever the size.
    assert set(published) == {"folders", "samples-p225", "samples-p226", "clip-durations", "clip-quality",
                              "worst-flagged-clips", "run-report"}


def test_one_folder_table_with_new_reused_failed_apart(published, corpus):
    results = corpus[0]
    assert json.loads(published["folders"].data) == [
        {"folder": "p225", "files": 3, "new": 3, "reused": 0, "lines": 3, "failed": 0, "flagged": 1,
         "changed": "yes", "jsonl": f"{results}/p225.jsonl"},
        {"folder": "p226", "files": 3, "new": 1, "reused": 1, "lines": 2, "failed": 1, "flagged": 0,
         "changed": "yes", "jsonl": f"{results}/p226.jsonl"},
        {"folder": "p227", "files": 1, "new": 0, "reused": 1, "lines": 1, "failed": 0, "flagged": 0,
         "changed": "no", "jsonl": f"{results}/p227.jsonl"},
    ]


def test_sample_table_from_lines_written_with_quality(published):
    rows = json.loads(published["samples-p225"].data)
    assert [(r["id"], r["status"], r["duration_s"], r["tokens"], r["flags"]) for r in rows] == [
        ("p225/p225_001_mic2.flac", "ok", 1.5, 10, "none"),
        ("p225/p225_002_mic2.flac", "flagged", 3.0, 20, "repetition"),
        ("p225/p225_003_mic2.flac", "ok", 4.5, 30, "none"),
    ]
    assert rows[1]["text"] == "Please call Stella 2."


def test_sample_table_takes_quality_from_intermediates_and_lists_errors(published):
    rows = json.loads(published["samples-p226"].data)
    assert [tuple(r.values()) for r in rows] == [
        ("p226/p226_001_mic2.flac", "flagged", 2.25, 6, "low_confidence", "Ask her 1 | things."),
        ("p226/p226_002_mic2.flac", "ok", 4.5, 7, "none", "Ask her 2 | things."),
        ("p226/p226_009_mic2.flac", "failed: transcribe", "", "", "", "HTTP 400: not audio | bad header"),
    ]
    assert "first 2 of 2 lines, first 1 of 1 errors" in published["samples-p226"].description


def test_without_quality_fields_there_is_no_flags_column(prefect_harness, tmp_path):
    store = Store(str(tmp_path))
    store.write_lines("p1.jsonl", [OutputLine(id="p1/a.flac", transcription="Hi.", token_array=[1, 2])])
    store.write_record("transcriptions", Transcription(
        id="p1/a.flac", text="Hi.", language="en", duration=0.5, model="tiny.en", service_url="x", source=SOURCE))
    reports = [FolderReport(folder="p1", files=1, lines=1, new=1, jsonl=store.display("p1.jsonl"))]
    rows = json.loads(artifacts_of(publish_flow(reports, str(tmp_path), str(tmp_path)))["samples-p1"].data)
    assert rows == [{"id": "p1/a.flac", "status": "ok", "duration_s": 0.5, "tokens": 2, "text": "Hi."}]


@pytest.mark.parametrize("key, name", [("clip-durations", "durations.png"), ("clip-quality", "quality.png")])
def test_images_are_real_pngs_inlined_and_stored_on_the_results_root(published, corpus, key, name):
    artifact = published[key]
    assert artifact.type == "image"
    prefix = "data:image/png;base64,"
    assert artifact.data.startswith(prefix)
    png = base64.b64decode(artifact.data[len(prefix):])
    stored = corpus[0] / "_report" / name
    assert png.startswith(PNG_MAGIC) and stored.read_bytes() == png
    assert str(stored) in artifact.description
    assert "6 clips sampled" in artifact.description  # 3 + 2 + 1 lines, all read back


def test_durations_come_from_line_intermediate_or_audio_header(corpus):
    results, audio, _ = corpus
    store = Store(str(results))
    old = clip_of({"id": "p227/p227_001_mic2.flac", "transcription": "Old line.", "token_array": [1]}, store, str(audio))
    assert old.duration == pytest.approx(0.75) and not old.has_quality
    mid = clip_of({"id": "p226/p226_002_mic2.flac", "transcription": "x", "token_array": []}, store)
    assert (mid.duration, mid.snr_db, mid.avg_logprob, mid.has_quality) == (4.5, 12.5, -0.5, True)


def test_run_report_counts_work_apart_and_names_locations(published, corpus):
    results = corpus[0]
    report = published["run-report"]
    md = report.data
    assert "| 7 | 4 | 2 | 1 | 1 | 6 | 3 | 2 | 0.005 |" in md  # files new reused failed flagged lines folders changed h
    assert "**2.00 files/s** over the 4 files this run produced" in md
    assert f"`{results}`" in md and Path(str(results)).is_absolute()
    assert f"| lhotse | `{results}/exports/lhotse` |" in md
    assert "| hf | [https://example.org/ds](https://example.org/ds) |" in md
    assert "| p226/p226_009_mic2.flac | transcribe | HTTP 400: not audio \\| bad header |" in md
    assert f"`{results}/_report/durations.png`" in md
    # The plots are inline too: the same PNGs as the image artifacts, under their titles.
    for key, title in (("clip-durations", "Clip durations"), ("clip-quality", "Quality distributions")):
        assert f"## {title}\n\n![{title}]({published[key].data})" in md
    assert report.description.startswith("7 files: 4 new, 2 reused, 1 failed, 1 flagged")
    assert ("- flagged: **1 clip(s)** in 1 folder(s) (per folder in the `folders` table); "
            "the 1 worst are in the table `worst-flagged-clips`") in md


def test_worst_flagged_clip_row_without_intermediates_keeps_its_text(published):
    # p225 was written --with-quality and has no intermediates: the scores are blank, the row stays.
    assert json.loads(published["worst-flagged-clips"].data) == [
        {"folder": "p225", "id": "p225/p225_002_mic2.flac", "flags": "repetition", "compression_ratio": "",
         "avg_logprob": "", "text": "Please call Stella 2."},
    ]


def transcription(file_id: str, text: str, flags: list[str], compression_ratio: float, avg_logprob: float):
    return Transcription(
        id=file_id, text=text, language="en", duration=2.0, model="tiny.en", service_url="http://127.0.0.1:1",
        source=SOURCE, quality=TranscriptQuality(avg_logprob=avg_logprob, compression_ratio=compression_ratio,
                                                 words_per_second=3.0, flags=flags),
    )


@pytest.fixture(scope="module")
def ranked(prefect_harness, tmp_path_factory) -> dict:
    """Three folders' worst lists (as merge reports them: id, flags, text), published with 5 rows at most."""
    results = tmp_path_factory.mktemp("worst")
    store = Store(str(results))
    clips = {  # id: (flags, compression ratio, avg logprob); the scores live in the intermediates
        "pa/a1.flac": (["repetition", "low_confidence"], 2.6, -1.2),
        "pa/a2.flac": (["low_confidence"], 1.2, -1.3),
        "pb/b1.flac": (["repetition", "too_fast"], 3.1, -0.4),
        "pb/b2.flac": (["low_confidence"], 1.2, -1.5),
        "pb/b3.flac": (["no_speech"], 1.2, -1.5),  # ties b2 on both scores: the id decides
        "pb/b4.flac": (["low_confidence"], 1.1, -1.1),  # the sixth: not shown
    }
    for file_id, (flags, ratio, logprob) in clips.items():
        store.write_record("transcriptions", transcription(file_id, f"Text of {file_id} | long " + "la " * 80,
                                                           flags, ratio, logprob))
    store.write_lines("pa.jsonl", [])
    store.write_lines("pb.jsonl", [])
    store.write_lines("pc.jsonl", [])
    store.write_lines("pd.jsonl", [])

    def worst(*ids: str) -> list[dict]:
        return [{"id": i, "flags": clips[i][0], "text": f"Text of {i} | long " + "la " * 80} for i in ids]

    reports = [
        # pc is listed first and its entry carries its scores: no intermediate is read for it.
        FolderReport(folder="pc", files=9, lines=9, flagged=1, jsonl=store.display("pc.jsonl"), worst=[
            {"id": "pc/c1.flac", "flags": ["low_confidence"], "text": "Short.", "compression_ratio": 2.0,
             "avg_logprob": -1.05}]),
        FolderReport(folder="pa", files=9, lines=9, flagged=2, jsonl=store.display("pa.jsonl"),
                     worst=worst("pa/a1.flac", "pa/a2.flac")),
        FolderReport(folder="pb", files=9, lines=9, flagged=7, jsonl=store.display("pb.jsonl"),
                     worst=worst("pb/b1.flac", "pb/b2.flac", "pb/b3.flac", "pb/b4.flac")),
        FolderReport(folder="pd", files=9, lines=9, jsonl=store.display("pd.jsonl")),  # nothing flagged
    ]
    return artifacts_of(publish_worst_flow(reports, str(results), 5))


def test_worst_flagged_clips_are_ranked_across_folders_as_merge_ranks_them(ranked):
    table = ranked["worst-flagged-clips"]
    rows = json.loads(table.data)
    # Most flags, then highest compression ratio, then lowest avg_logprob, then id; five rows.
    assert [(r["folder"], r["id"], r["flags"], r["compression_ratio"], r["avg_logprob"]) for r in rows] == [
        ("pb", "pb/b1.flac", "repetition, too_fast", 3.1, -0.4),
        ("pa", "pa/a1.flac", "repetition, low_confidence", 2.6, -1.2),
        ("pc", "pc/c1.flac", "low_confidence", 2.0, -1.05),
        ("pb", "pb/b2.flac", "low_confidence", 1.2, -1.5),
        ("pb", "pb/b3.flac", "no_speech", 1.2, -1.5),
    ]
    assert list(rows[0]) == ["folder", "id", "flags", "compression_ratio", "avg_logprob", "text"]
    text = rows[0]["text"]  # cut to one table cell, whitespace folded
    assert len(text) == 160 and text.startswith("Text of pb/b1.flac | long la la") and text.endswith("…")
    assert rows[2]["text"] == "Short."
    assert table.description.startswith("the 5 worst of 10 flagged clips in 3 folders")
    md = ranked["run-report"].data
    assert "- flagged: **10 clip(s)** in 3 folder(s)" in md and "the 5 worst are in the table `worst-flagged-clips`" in md


def test_no_worst_table_when_nothing_is_flagged(prefect_harness, tmp_path):
    store = Store(str(tmp_path))
    store.write_lines("p1.jsonl", [OutputLine(id="p1/a.flac", transcription="Hi.", token_array=[1])])
    reports = [FolderReport(folder="p1", files=1, lines=1, new=1, jsonl=store.display("p1.jsonl"))]
    published = artifacts_of(publish_worst_flow(reports, str(tmp_path), 50))
    assert {"folders", "run-report"} <= set(published) and "worst-flagged-clips" not in published
    assert "flagged:" not in published["run-report"].data


def test_a_folder_that_cannot_be_read_is_named_and_the_rest_published(prefect_harness, tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes("p1.jsonl", b'{"id": "p1/a.flac", "transcription": "ok", "token_array": [1]}\nnot json\n')
    store.write_bytes("p2.jsonl", b'{"id": "p2/b.flac", "transcription": "fine", "token_array": [1, 2]}\n')
    reports = [FolderReport(folder=f, files=2, lines=2, new=2, jsonl=store.display(f"{f}.jsonl")) for f in ("p1", "p2")]
    run_id = publish_flow(reports, str(tmp_path), str(tmp_path))
    published = artifacts_of(run_id)
    assert {"folders", "run-report", "samples-p2"} <= set(published)
    assert "samples-p1" not in published
    bad = f"{tmp_path}/p1.jsonl line 2 is not JSON"
    messages = logs_of(run_id)
    assert any(m.startswith("no sample table for folder p1: " + bad) for m in messages), messages
    assert any(m.startswith("folder p1 left out of the plots: " + bad) for m in messages), messages


def test_progress_is_logged_on_the_run_users_open_and_on_its_artifact(prefect_harness):
    run_id, subflow_id = progress_flow(3)
    messages = logs_of(run_id)
    assert [m for m in messages if m.startswith("shards ")] == [
        "shards 0/3 done", "shards 1/3 done (10/30 files)", "shards 2/3 done (20/30 files)",
        "shards 3/3 done (30/30 files)",
    ]
    assert not [m for m in logs_of(subflow_id) if m.startswith("shards ")]
    progress = artifacts_of(run_id)["progress"]
    assert (progress.data, progress.description) == (100.0, "shards 3/3 done (30/30 files)")


def test_progress_of_a_large_run_logs_every_five_percent(prefect_harness):
    run_id, _ = progress_flow(400)
    shard_lines = [m for m in logs_of(run_id) if m.startswith("shards ")]
    assert shard_lines[0] == "shards 0/400 done" and shard_lines[-1] == "shards 400/400 done (4,000/4,000 files)"
    assert len(shard_lines) == 21  # 0/400, then 20, 40, ... 400


def test_histogram_bins_count_every_value_and_ticks_are_round():
    edges, counts = bins_of([0.0, 0.1, 0.5, 1.0, 1.0])
    assert sum(counts) == 5 and counts[-1] == 2 and edges[0] == 0.0 and edges[-1] == 1.0
    assert nice_ticks(0, 7.3) == [0, 2, 4, 6]
    assert nice_ticks(-0.62, 0.11, 6) == [-0.6, -0.4, -0.2, 0.0]


def test_histogram_png_has_one_panel_per_non_empty_series():
    png = histogram_png([Panel("a", "s", [1.0, 2.0]), Panel("b", "s", []), Panel("c", "s", [3.0])], columns=2)
    assert png.startswith(PNG_MAGIC)
    from PIL import Image
    import io

    assert Image.open(io.BytesIO(png)).size == (1240, 340)  # two panels side by side; the empty one dropped
    with pytest.raises(ValueError, match="nothing to plot"):
        histogram_png([Panel("a", "s", [])])

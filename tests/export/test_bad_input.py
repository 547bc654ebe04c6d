"""Bad lines and bad audio cost their own sample, never the export.

Tokens past the manifest's codebook, a FLAC that is truncated after a readable header, and a
Shar shard in which no cut survives: each is reported in `export.errors.jsonl` and the export
finishes with everything else in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.export import export
from tasks.export.reader import BadLine, Sample, flat_quality, parse_line, quality_duration
from tasks.manifest import write_manifest
from tasks.records import RunSummary
from tasks.settings import PipelineSettings
from tasks.tokenisers import get_tokeniser


def _errors(out: Path) -> dict[str, str]:
    return {e["id"]: e["error"] for e in map(json.loads, (out / "export.errors.jsonl").read_text().splitlines())}


def _results_root(base: Path, lines: list[dict], *, manifest: bool) -> Path:
    root = base / "results"
    root.mkdir(parents=True)
    by_folder: dict[str, list[dict]] = {}
    for line in lines:
        by_folder.setdefault(line["id"].split("/")[0], []).append(line)
    for folder, folder_lines in by_folder.items():
        (root / f"{folder}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in folder_lines))
    if manifest:
        settings = PipelineSettings(audio_root=str(base / "audio"), results_root=str(root), tokenizer="simulated")
        summary = RunSummary(folders=len(by_folder), files=len(lines), lines=len(lines), failed=0, audio_hours=0.0,
                             wall_seconds=1.0, files_per_second=1.0, results_root=str(root))
        write_manifest(str(root), settings=settings, health={}, summary=summary, run_id=None,
                       tokenizer_settings=get_tokeniser("simulated", device="cpu", workload_size=0).settings)
    return root


@pytest.mark.parametrize("fmt", ["hf", "webdataset"])
def test_a_token_past_the_codebook_is_a_bad_line_and_the_export_finishes(tmp_path: Path, fmt: str) -> None:
    """simulated: codebook 8192, uint16. 70000 overflowed uint16 and killed the export; 8192 was
    exported as if it meant something."""
    lines = [
        {"id": "p1/a.flac", "transcription": "a", "token_array": [0, 8191]},
        {"id": "p1/b.flac", "transcription": "b", "token_array": [3, 70_000]},
        {"id": "p1/c.flac", "transcription": "c", "token_array": [8192]},
        {"id": "p1/d.flac", "transcription": "d", "token_array": [5]},
    ]
    root = _results_root(tmp_path, lines, manifest=True)
    out = tmp_path / "out"
    report = export(str(root), fmt, str(out))
    assert (report.lines, report.samples, report.failed, report.shards) == (4, 2, 2, 1)
    errors = _errors(out)
    assert set(errors) == {"p1/b.flac", "p1/c.flac"}
    assert "token 70000 at index 1 is not below 8192" in errors["p1/b.flac"]
    assert errors["p1/c.flac"].startswith("p1.jsonl:3: not a result line: token 8192 at index 0 is not below 8192")
    if fmt == "hf":
        import pyarrow.parquet as pq

        table = pq.read_table(out / "data")
        assert table.column("id").to_pylist() == ["p1/a.flac", "p1/d.flac"]
        assert table.column("token_array").to_pylist() == [[0, 8191], [5]]


def test_without_a_manifest_tokens_must_fit_int64_and_bools_are_not_tokens() -> None:
    line = {"id": "p1/a.flac", "transcription": "a"}
    assert isinstance(parse_line(json.dumps({**line, "token_array": [2**63 - 1]}).encode(), "p1", "w:1"), Sample)
    too_big = parse_line(json.dumps({**line, "token_array": [2**63]}).encode(), "p1", "w:1")
    assert isinstance(too_big, BadLine) and "not below 9223372036854775808" in too_big.error
    as_bool = parse_line(json.dumps({**line, "token_array": [True]}).encode(), "p1", "w:1")
    assert isinstance(as_bool, BadLine) and "non-negative integers" in as_bool.error


def _flac(path: Path, seconds: float, *, truncate: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    sf.write(path, (0.3 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000)
    if truncate:  # the header (STREAMINFO) still reads; decoding loses sync
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert sf.info(path).frames == int(16_000 * seconds)


def test_lhotse_shar_reports_bad_audio_and_finishes_an_all_bad_shard(tmp_path: Path) -> None:
    from lhotse import CutSet

    audio = tmp_path / "audio"
    _flac(audio / "p1/good.flac", 0.5)
    _flac(audio / "p1/cut.flac", 0.5, truncate=True)
    _flac(audio / "p2/cut.flac", 0.5, truncate=True)
    ids = ["p1/cut.flac", "p1/good.flac", "p2/cut.flac", "p2/gone.flac"]
    root = _results_root(tmp_path, [{"id": i, "transcription": i, "token_array": [1, 2]} for i in ids], manifest=True)
    out = tmp_path / "out"
    # Shard 0: p1's two lines (one cut survives); shard 1: p2's (a truncated file and a missing one).
    report = export(str(root), "lhotse", str(out), shard_size="2", shar=True)
    assert (report.samples, report.failed, report.shards) == (1, 3, 2)
    errors = _errors(out)
    assert set(errors) == {"p1/cut.flac", "p2/cut.flac", "p2/gone.flac"}
    assert "lhotse could not load the audio" in errors["p1/cut.flac"] and "lost sync" in errors["p2/cut.flac"]
    assert "cannot read the audio header" in errors["p2/gone.flac"]
    assert all((out / f).is_file() for f in report.files) and len(report.files) == 4
    cuts = list(CutSet.from_shar(in_dir=out / "shar"))
    assert [c.id for c in cuts] == ["p1/good.flac"] and cuts[0].token_array == [1, 2]
    assert cuts[0].load_audio().shape == (1, 8000)
    # Both shards are complete: a rerun keeps them.
    assert export(str(root), "lhotse", str(out), shard_size="2", shar=True).reused_shards == 2


def test_flat_quality_reads_merges_flat_object_and_lifts_groups() -> None:
    flat = {"duration": 1.5, "language": "en", "snr_db": 12.0, "flags": []}
    assert flat_quality(flat) == flat and quality_duration(flat) == 1.5
    grouped = {"duration": 2.0, "audio": {"snr_db": 9.0, "duration": 7.0}}
    assert flat_quality(grouped) == {"duration": 2.0, "snr_db": 9.0}  # the top level wins
    assert flat_quality(None) == {} and flat_quality(["x"]) == {} and quality_duration({"duration": True}) is None

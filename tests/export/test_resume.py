"""Exports are atomic per shard and resumable: finished shards are kept, changed ones redone."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flows.cli import main
from tasks.export import ExportError, export
from tasks.export.shards import INDEX_DIR, parse_shard_size
from tasks.storage import TEMP_PREFIX, TEMP_SUFFIX
from tests.export.conftest import MISSING, Results, build_results


def _state(out: Path) -> dict[str, tuple[int, int]]:
    """inode and mtime of every shard file: a rewrite (temp + rename) changes the inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("manifest_*.json")}


@pytest.fixture()
def own_results(tmp_path: Path) -> Results:
    return build_results(tmp_path / "src", with_quality=False)


def test_rerun_keeps_complete_shards_and_redoes_changed_or_unfinished_ones(own_results: Results, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = export(str(own_results.root), "nemo", str(out), shard_size="2")
    assert (first.shards, first.reused_shards) == (4, 0)
    before = _state(out)

    again = export(str(own_results.root), "nemo", str(out), shard_size="2")
    assert again.reused_shards == 4 and _state(out) == before

    # A killed export: shard 1's index never written (it is written last), a temp left behind.
    (out / INDEX_DIR / "shard-000001.json").unlink()
    torn = out / f"{TEMP_PREFIX}crash{TEMP_SUFFIX}"
    torn.write_text("torn")
    os.utime(torn, (time.time() - 7200, time.time() - 7200))
    # A line changed since (a rerun of the pipeline transcribed p226_002 anew: shard 2).
    jsonl = own_results.root / "p226.jsonl"
    jsonl.write_text(jsonl.read_text().replace('"transcription": ""', '"transcription": "Now heard."'))
    resumed = export(str(own_results.root), "nemo", str(out), shard_size="2")
    after = _state(out)
    assert resumed.reused_shards == 2 and not torn.exists()
    assert {n for n in before if after[n] != before[n]} == {"manifest_000001.json", "manifest_000002.json"}
    texts = [json.loads(x)["text"] for x in (out / "manifest_000002.json").read_text().splitlines()]
    assert texts[0] == "Now heard."

    # Other options are another export: every shard is redone.
    redone = export(str(own_results.root), "nemo", str(out), shard_size="3")
    assert redone.reused_shards == 0 and redone.shards == 3
    assert sorted(p.name for p in out.glob("manifest_*.json")) == [f"manifest_00000{i}.json" for i in range(3)]
    assert sorted(p.name for p in (out / INDEX_DIR).glob("*.json")) == [f"shard-00000{i}.json" for i in range(3)]


def test_corpus_shrink_removes_stale_shards(own_results: Results, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export(str(own_results.root), "webdataset", str(out), shard_size="2")
    assert len(list(out.glob("shard-*.tar"))) == 4
    (own_results.root / "p227.jsonl").unlink()
    report = export(str(own_results.root), "webdataset", str(out), shard_size="2")
    assert report.shards == 3 and report.reused_shards == 2  # shard 2 held p226 + p227's first line
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]


def test_shard_size_parses_samples_and_bytes() -> None:
    assert parse_shard_size("500").samples == 500
    assert parse_shard_size("2MB").bytes == 2_000_000 and parse_shard_size("1GiB").bytes == 1 << 30
    for bad in ("0", "-3", "12 parsecs", "MB"):
        with pytest.raises(ExportError, match="--shard-size"):
            parse_shard_size(bad)


def test_cli_exports_and_exits_1_naming_the_lines_it_could_not_export(results: Results, tmp_path: Path) -> None:
    out = tmp_path / "nemo"
    result = CliRunner().invoke(main, ["export", str(results.root), "--format", "nemo", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"6 of 7 lines -> 1 nemo shard(s) in {out}" in result.output
    assert f"1 line(s) not exported; see {out}/export.errors.jsonl" in result.output and MISSING in result.output
    summary = json.loads((out / "export.json").read_text())
    assert (summary["lines"], summary["samples"], summary["failed"]) == (7, 6, 1)


def test_cli_refuses_what_it_cannot_do_with_one_line(results: Results, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(results.root, bare)
    (bare / "manifest.json").unlink()
    cases = [
        (["export", str(tmp_path / "none"), "--format", "hf", "--out", str(tmp_path / "o")], "nothing to export"),
        (["export", str(bare), "--format", "nemo", "--out", str(tmp_path / "o")], "pass --audio-root"),
        (["export", str(results.root), "--format", "nemo", "--with-audio", "--out", str(tmp_path / "o")],
         "--with-audio is for --format hf"),
        (["export", str(results.root), "--format", "hf", "--shar", "--out", str(tmp_path / "o")], "--shar is for"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    ok = CliRunner().invoke(main, ["export", str(bare), "--format", "nemo", "--audio-root", str(results.audio_root),
                                   "--out", str(tmp_path / "bare-out")])
    assert "has no manifest.json" in ok.output and "6 of 7 lines" in ok.output

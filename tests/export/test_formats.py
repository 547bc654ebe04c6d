"""Each export format, LOADED with its own ecosystem's library and compared with the JSONL.

Every line is accounted for: exported (same id, text, tokens, duration/audio) or listed in
`export.errors.jsonl` with its reason (the one line whose audio is gone).
"""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.export import export
from tasks.manifest import MANIFEST_NAME
from tests.export.conftest import MISSING, Results


def _errors(out: Path) -> dict[str, str]:
    return {e["id"]: e["error"] for e in map(json.loads, (out / "export.errors.jsonl").read_text().splitlines())}


def _manifest_copied(results: Results, out: Path) -> None:
    assert json.loads((out / MANIFEST_NAME).read_text()) == json.loads((results.root / MANIFEST_NAME).read_text())


# -- lhotse ----------------------------------------------------------------------------------------


def test_lhotse_cuts_recordings_supervisions_load_in_lhotse(results: Results, tmp_path: Path) -> None:
    from lhotse import CutSet, RecordingSet, SupervisionSet, load_manifest

    report = export(str(results.root), "lhotse", str(tmp_path), shard_size="2")
    assert report.shards == 4 and report.lines == len(results.lines) == report.samples + report.failed
    cuts = CutSet.from_files(sorted(glob.glob(f"{tmp_path}/cuts.*.jsonl.gz")))
    recordings = RecordingSet.from_recordings(r for p in sorted(tmp_path.glob("recordings.*")) for r in load_manifest(p))
    supervisions = SupervisionSet.from_segments(s for p in sorted(tmp_path.glob("supervisions.*")) for s in load_manifest(p))
    exported = {c.id: c for c in cuts}
    assert set(exported) | set(_errors(tmp_path)) == set(results.lines)
    assert set(_errors(tmp_path)) == {MISSING} and "No such file" in _errors(tmp_path)[MISSING]
    for file_id, cut in exported.items():
        line = results.lines[file_id]
        assert cut.supervisions[0].text == line["transcription"] == supervisions[file_id].text
        assert cut.token_array == line["token_array"]  # the custom field, as lhotse exposes it
        assert cut.duration == pytest.approx(results.durations[file_id])
        assert recordings[file_id].duration == pytest.approx(results.durations[file_id])
        assert cut.supervisions[0].speaker == file_id.split("/")[0]
    stereo = exported["p225/p225_003_mic2.flac"]
    assert stereo.num_channels == 2
    expected, rate = sf.read(results.audio_root / "p226/p226_001_mic2.flac", dtype="float32")
    loaded = exported["p226/p226_001_mic2.flac"].load_audio()  # lhotse reads the original file
    assert rate == 48_000 and loaded.shape == (1, expected.size)
    np.testing.assert_allclose(loaded[0], expected, atol=1e-4)
    _manifest_copied(results, tmp_path)


def test_lhotse_shar_loads_with_audio(results: Results, tmp_path: Path) -> None:
    from lhotse import CutSet

    report = export(str(results.root), "lhotse", str(tmp_path), shard_size="4", shar=True)
    assert report.files == ["shar/cuts.000000.jsonl.gz", "shar/recording.000000.tar",
                            "shar/cuts.000001.jsonl.gz", "shar/recording.000001.tar"]
    cuts = {c.id: c for c in CutSet.from_shar(in_dir=tmp_path / "shar")}
    assert set(cuts) | set(_errors(tmp_path)) == set(results.lines) and set(_errors(tmp_path)) == {MISSING}
    for file_id, cut in cuts.items():
        assert cut.supervisions[0].text == results.lines[file_id]["transcription"]
        assert cut.token_array == results.lines[file_id]["token_array"]
        expected, _ = sf.read(results.audio_root / file_id, dtype="float32", always_2d=True)
        np.testing.assert_allclose(cut.load_audio(), expected.T, atol=1e-4)  # from the Shar tar, not the file


# -- Hugging Face ----------------------------------------------------------------------------------


def test_hf_parquet_loads_in_datasets_with_audio(results: Results, tmp_path: Path) -> None:
    import datasets

    out = tmp_path / "hf"
    report = export(str(results.root), "hf", str(out), shard_size="3", with_audio=True)
    ds = datasets.load_dataset("parquet", data_files=sorted(glob.glob(f"{out}/data/*.parquet")), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == report.samples and report.shards == 3
    rows = {row["id"]: row for row in ds}
    assert set(rows) | set(_errors(out)) == set(results.lines) and set(_errors(out)) == {MISSING}
    for file_id, row in rows.items():
        line = results.lines[file_id]
        assert (row["transcription"], row["token_array"]) == (line["transcription"], line["token_array"])
        assert row["audio"]["bytes"] == (results.audio_root / file_id).read_bytes()
        assert row["audio"]["path"] == file_id
    assert str(ds.features["token_array"].feature.dtype) == "uint16"  # the manifest's value dtype
    assert "quality" not in ds.column_names  # the lines have none
    # The card's `configs` lets datasets find the shards from the directory alone.
    again = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))
    assert sorted(again["id"]) == sorted(rows)
    _manifest_copied(results, out)


def test_hf_quality_fields_become_typed_columns(quality_results: Results, tmp_path: Path) -> None:
    import datasets

    report = export(str(quality_results.root), "hf", str(tmp_path), shard_size="100")
    assert report.failed == 0 and report.samples == len(quality_results.lines)  # no audio asked: none needed
    ds = datasets.load_dataset("parquet", data_files=f"{tmp_path}/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "cache"))
    for row in ds:
        quality = quality_results.lines[row["id"]]["quality"]
        assert row["avg_logprob"] == pytest.approx(quality["avg_logprob"])
        assert row["flags"] == quality["flags"] and row["language"] == "en"
        assert row["snr_db"] == quality["snr_db"]  # audio fields too, null kept null
        assert row["sample_rate"] == 16000 and json.loads(row["quality"]) == quality
    assert ds.features["snr_db"].dtype == "float64" and ds.features["channels"].dtype == "int64"


# -- WebDataset ------------------------------------------------------------------------------------


def test_webdataset_shards_load_in_webdataset_within_the_byte_bound(results: Results, tmp_path: Path) -> None:
    import webdataset as wds

    limit = 120_000
    report = export(str(results.root), "webdataset", str(tmp_path), shard_size=f"{limit}B")
    tars = sorted(tmp_path.glob("shard-*.tar"))
    assert len(tars) == report.shards >= 2
    biggest_clip = max((results.audio_root / i).stat().st_size for i in results.durations)
    for tar in tars:  # bounded, unless one sample alone is bigger than the bound
        assert tar.stat().st_size <= max(limit, biggest_clip + 20_000), tar
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode())
    assert report.samples == len(samples) == len(results.lines) and report.failed == 0
    seen = set()
    for sample in samples:
        meta = sample["json"]
        line = results.lines[meta["id"]]
        seen.add(meta["id"])
        assert sample["txt"] == line["transcription"]
        tokens = sample["tokens.npy"]
        assert tokens.dtype == np.uint16 and tokens.tolist() == line["token_array"]
        if meta["id"] == MISSING:  # text and tokens kept; the audio is missing and says so
            assert "flac" not in sample and "No such file" in meta["audio_error"]
            continue
        assert sample["flac"] == (results.audio_root / meta["id"]).read_bytes()
        audio, rate = sf.read(io.BytesIO(sample["flac"]))
        assert meta["duration"] == pytest.approx(results.durations[meta["id"]]) == audio.shape[0] / rate
    assert seen == set(results.lines)
    _manifest_copied(results, tmp_path)


# -- NeMo ------------------------------------------------------------------------------------------


def test_nemo_manifest_has_its_documented_fields(results: Results, tmp_path: Path) -> None:
    """NeMo's own reader needs nemo_toolkit (hundreds of MB of deps); its documented fields are
    audio_filepath, duration (seconds) and text, one JSON object per line."""
    report = export(str(results.root), "nemo", str(tmp_path), shard_size="4")
    entries = [json.loads(x) for p in sorted(tmp_path.glob("manifest_*.json")) for x in p.read_text().splitlines()]
    assert len(entries) == report.samples == len(results.lines) - 1 and report.shards == 2
    assert set(_errors(tmp_path)) == {MISSING} and "no quality duration" in _errors(tmp_path)[MISSING]
    for entry in entries:
        line = results.lines[entry["id"]]
        assert entry["text"] == line["transcription"]
        info = sf.info(entry["audio_filepath"])  # an absolute path NeMo can open
        assert Path(entry["audio_filepath"]).is_absolute()
        assert entry["duration"] == pytest.approx(info.duration) == pytest.approx(results.durations[entry["id"]])


def test_nemo_takes_duration_from_quality_when_the_audio_is_gone(quality_results: Results, tmp_path: Path) -> None:
    report = export(str(quality_results.root), "nemo", str(tmp_path))
    entries = {e["id"]: e for e in map(json.loads, (tmp_path / "manifest_000000.json").read_text().splitlines())}
    assert report.failed == 0 and entries[MISSING]["duration"] == 0.6


def test_webdataset_refuses_two_ids_that_share_a_key(tmp_path: Path) -> None:
    """`a.b.flac` and `a_b.flac` both map to key `a_b`: WebDataset would merge them into one sample."""
    root = tmp_path / "results"
    root.mkdir()
    lines = [{"id": f"p1/{name}", "transcription": name, "token_array": [1]} for name in ("a.b.flac", "a_b.flac")]
    (root / "p1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = export(str(root), "webdataset", str(tmp_path / "out"), audio_root=str(tmp_path))
    assert (report.samples, report.failed) == (1, 1) and report.errors[0].id == "p1/a_b.flac"
    assert "is another id's" in report.errors[0].error


def test_lines_that_are_not_result_lines_are_reported_by_file_and_line(results: Results, tmp_path: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    good = {"id": "p1/a.flac", "transcription": "a", "token_array": [1, 2]}
    (root / "p1.jsonl").write_text(
        json.dumps(good) + "\n" + "{torn\n" + json.dumps({**good, "id": "p1/b.flac", "token_array": ["x"]}) + "\n"
    )
    report = export(str(root), "hf", str(tmp_path / "out"))
    assert (report.lines, report.samples, report.failed) == (3, 1, 2)
    errors = _errors(tmp_path / "out")
    assert errors["p1.jsonl:2"].startswith("p1.jsonl:2: not a result line")
    assert "not a list of non-negative integers" in errors["p1/b.flac"]

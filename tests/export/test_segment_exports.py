"""Exports of long recordings' segment lines carry offsets (issue 22), loaded by each library.

The results root is built by hand as merge writes it: a long 44.1 kHz stereo recording's
segment lines (`id` `{source}#t=start,end`, `source_id`, `start`, `end`) beside a whole clip's line.
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
from tasks.manifest import write_manifest
from tasks.records import RunSummary, segment_id
from tasks.settings import PipelineSettings
from tasks.tokenisers import get_tokeniser
from tests.fixtures.longform import make_long_recording

SOURCE = "book/ch01.flac"
SPANS = [(0.3, 9.9), (10.4, 21.0), (21.5, 30.25)]
CLIP = "book/intro.flac"


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("segmented")
    audio, root = base / "audio", base / "results"
    make_long_recording(audio / SOURCE, 31, rate=44_100, channels=2, seed=21)
    (audio / CLIP).parent.mkdir(parents=True, exist_ok=True)
    sf.write(audio / CLIP, np.zeros(16_000, np.float32), 16_000, format="FLAC")
    lines = [{"id": CLIP, "transcription": "Intro.", "token_array": [1, 2]}]
    lines += [
        {"id": segment_id(SOURCE, s, e), "transcription": f"part {i}", "token_array": [i, i + 1, i + 2],
         "source_id": SOURCE, "start": s, "end": e}
        for i, (s, e) in enumerate(SPANS)
    ]
    root.mkdir()
    (root / "book.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    settings = PipelineSettings(audio_root=str(audio), results_root=str(root), tokenizer="simulated")
    summary = RunSummary(folders=1, files=2, lines=4, failed=0, audio_hours=0.01, wall_seconds=1.0,
                         files_per_second=2.0, results_root=str(root))
    write_manifest(str(root), settings=settings, health={"fingerprint": "abc"}, summary=summary, run_id="r",
                   tokenizer_settings=get_tokeniser("simulated", device="cpu", workload_size=0).settings)
    return base


def test_lhotse_one_recording_per_source_and_a_cut_per_segment(segmented: Path, tmp_path: Path) -> None:
    from lhotse import CutSet, load_manifest

    report = export(str(segmented / "results"), "lhotse", str(tmp_path))
    assert report.failed == 0 and report.samples == 4
    recordings = [r for p in sorted(tmp_path.glob("recordings.*")) for r in load_manifest(p)]
    assert sorted(r.id for r in recordings) == [SOURCE, CLIP]
    supervisions = {s.id: s for p in sorted(tmp_path.glob("supervisions.*")) for s in load_manifest(p)}
    cuts = {c.id: c for c in CutSet.from_files(sorted(glob.glob(f"{tmp_path}/cuts.*.jsonl.gz")))}
    source, rate = sf.read(segmented / "audio" / SOURCE, dtype="float32")
    for i, (start, end) in enumerate(SPANS):
        line_id = segment_id(SOURCE, start, end)
        cut = cuts[line_id]
        assert cut.recording.id == SOURCE and cut.start == pytest.approx(start)
        assert cut.duration == pytest.approx(end - start)
        assert cut.supervisions[0].text == f"part {i}" and cut.token_array == [i, i + 1, i + 2]
        assert supervisions[line_id].recording_id == SOURCE
        assert supervisions[line_id].start == pytest.approx(start)  # in the recording
        assert supervisions[line_id].duration == pytest.approx(end - start)
        loaded = cut.load_audio()  # lhotse reads exactly the span of the source
        first = int(round(start * rate))
        assert loaded.shape[0] == 2
        np.testing.assert_allclose(loaded[0, :1000], source[first : first + 1000, 0], atol=1e-4)
    assert cuts[CLIP].start == 0 and cuts[CLIP].duration == pytest.approx(1.0)


def test_nemo_segments_have_offset_and_duration(segmented: Path, tmp_path: Path) -> None:
    report = export(str(segmented / "results"), "nemo", str(tmp_path))
    entries = {e["id"]: e for p in sorted(tmp_path.glob("manifest_*.json")) for e in map(json.loads, p.read_text().splitlines())}
    assert report.failed == 0 and len(entries) == 4
    assert "offset" not in entries[CLIP]
    for start, end in SPANS:
        entry = entries[segment_id(SOURCE, start, end)]
        assert entry["audio_filepath"] == str(segmented / "audio" / SOURCE)
        assert (entry["offset"], entry["duration"]) == (start, pytest.approx(end - start))


def test_hf_segments_embed_their_span_and_name_their_source(segmented: Path, tmp_path: Path) -> None:
    import datasets

    report = export(str(segmented / "results"), "hf", str(tmp_path), with_audio=True)
    assert report.failed == 0
    ds = datasets.load_dataset("parquet", data_files=f"{tmp_path}/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "cache"))
    rows = {row["id"]: row for row in ds}
    assert rows[CLIP]["source_id"] is None and rows[CLIP]["start"] is None
    source, rate = sf.read(segmented / "audio" / SOURCE, dtype="float32")
    for start, end in SPANS:
        row = rows[segment_id(SOURCE, start, end)]
        assert (row["source_id"], row["start"], row["end"]) == (SOURCE, start, end)
        audio, span_rate = sf.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32")
        assert span_rate == rate and audio.shape == (int(round(end * rate)) - int(round(start * rate)), 2)
        first = int(round(start * rate))
        np.testing.assert_allclose(audio[:1000], source[first : first + 1000], atol=1e-4)


def test_webdataset_segments_carry_their_span(segmented: Path, tmp_path: Path) -> None:
    import webdataset as wds

    report = export(str(segmented / "results"), "webdataset", str(tmp_path))
    assert report.failed == 0
    samples = {s["json"]["id"]: s for s in wds.WebDataset(
        [str(t) for t in sorted(tmp_path.glob("shard-*.tar"))], shardshuffle=False).decode()}
    assert len(samples) == 4
    for i, (start, end) in enumerate(SPANS):
        sample = samples[segment_id(SOURCE, start, end)]
        meta = sample["json"]
        assert (meta["source_id"], meta["start"], meta["end"]) == (SOURCE, start, end)
        assert meta["duration"] == pytest.approx(end - start, abs=1e-4) and meta["channels"] == 2
        assert sample["txt"] == f"part {i}" and sample["tokens.npy"].tolist() == [i, i + 1, i + 2]
        audio, rate = sf.read(io.BytesIO(sample["flac"]))
        assert audio.shape[0] / rate == pytest.approx(end - start, abs=1e-4)

"""Discovery, batching and sharding on real files (local and memory://)."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pytest

from tasks.discover import group_folders, is_candidate, list_audio, make_batches, make_shards
from tasks.records import AudioFile, SourceInfo

DEMO = Path(__file__).parents[2] / "flows" / "demo_data" / "audio"
EXTS = (".flac", ".wav")


def test_lists_demo_corpus_with_relative_ids_sorted():
    files, errors = list_audio(str(DEMO), EXTS)
    ids = [f.id for f in files]
    assert errors == []
    assert ids == sorted(ids)
    assert "p225/p225_001_mic2.flac" in ids
    assert {f.folder for f in files} == {"p225", "p226", "p227", "p228"}
    assert all(f.source.size > 0 and f.source.mtime for f in files)


def test_nested_folders_hidden_and_temp_files(tmp_path):
    clip = DEMO / "p225" / "p225_001_mic2.flac"
    for rel in ["a/b/x.flac", "a/y.FLAC", "a/.hidden.flac", "a/z.flac.part", "a/notes.txt", "top.wav"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, tmp_path / rel)
    files, _ = list_audio(str(tmp_path), EXTS)
    assert [(f.id, f.folder) for f in files] == [("a/b/x.flac", "a/b"), ("a/y.FLAC", "a"), ("top.wav", "_root")]


def test_same_stem_different_extension_is_refused_not_overwritten(tmp_path):
    clip = DEMO / "p225" / "p225_001_mic2.flac"
    (tmp_path / "s").mkdir()
    shutil.copy(clip, tmp_path / "s" / "u.flac")
    shutil.copy(clip, tmp_path / "s" / "u.wav")
    files, errors = list_audio(str(tmp_path), EXTS)
    assert [f.id for f in files] == ["s/u.flac"]
    assert [(e.id, e.stage) for e in errors] == [("s/u.wav", "discover")]
    assert "s/u.flac" in errors[0].error


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio root not found"):
        list_audio(str(tmp_path / "nope"), EXTS)


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    data = (DEMO / "p226" / "p226_001_mic2.flac").read_bytes()
    fs.pipe("/disc-test/p226/a.flac", data)
    fs.pipe("/disc-test/p227/b.flac", data)
    files, _ = list_audio("memory://disc-test", EXTS)
    assert [f.id for f in files] == ["p226/a.flac", "p227/b.flac"]
    assert files[0].path == "memory:///disc-test/p226/a.flac"
    assert files[0].source.size == len(data)


def test_candidates():
    assert is_candidate("p/x.flac", EXTS) and is_candidate("p/X.WAV", EXTS)
    assert not is_candidate("p/.x.flac", EXTS) and not is_candidate("p/x.mp3", EXTS)


def _files(folder: str, n: int) -> list[AudioFile]:
    source = SourceInfo(size=1, mtime="0")
    return [AudioFile.model_construct(id=f"{folder}/{i:05d}.flac", path="", source=source) for i in range(n)]


def test_batches_never_mix_folders():
    batches = make_batches(_files("a", 5) + _files("b", 3), batch_size=2)
    assert [(b.folder, len(b.files)) for b in batches] == [("a", 2), ("a", 2), ("a", 1), ("b", 2), ("b", 1)]


def test_small_corpus_keeps_every_worker_busy():
    shards = make_shards(make_batches(_files("a", 64), 4), n_workers=2, shard_max_files=1024)
    assert len(shards) == 8  # four per worker
    assert sum(s.n_files for s in shards) == 64


def test_task_runs_stay_bounded_as_the_corpus_grows():
    # 200,000 files (1,000,000 scales the same way: ~2,000 task runs) in 2,000 folders.
    files = [f for k in range(2000) for f in _files(f"spk{k:04d}", 100)]
    shards = make_shards(make_batches(files, 32), n_workers=8, shard_max_files=1024)
    merges = group_folders(sorted({f.folder for f in files}), max_groups=64)
    assert sum(s.n_files for s in shards) == 200_000
    assert max(s.n_files for s in shards) <= 1024
    assert len(shards) <= 200_000 / 1024 * 1.1  # batches of 32 pack shards nearly full
    assert 2 * len(shards) + len(merges) <= 2 * 215 + 64


def test_group_folders():
    assert group_folders(["a", "b", "c"], 2) == [["a", "b"], ["c"]]
    assert group_folders([], 4) == []

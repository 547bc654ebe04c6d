"""Discovery, batching and sharding on real files (local and memory://)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fsspec
import pytest

from tasks.discover import group_folders, id_problem, is_candidate, list_audio, make_batches, make_shards, scan_audio
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
    # 200,000 files in 2,000 folders: shards of <= 1,024 files, two task runs each, plus <= 64 merges.
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


# --- ids that are unsafe or would collide are refused, each as an error of its own (issue 13) ---

GOOD_CLIP = DEMO / "p225" / "p225_001_mic2.flac"


def test_a_name_that_is_not_utf8_is_refused_and_its_neighbour_still_listed(tmp_path):
    (tmp_path / "p1").mkdir()
    shutil.copy(GOOD_CLIP, tmp_path / "p1" / "good.flac")
    with open(os.path.join(os.fsencode(tmp_path), b"p1", b"caf\xe9.flac"), "wb") as f:
        f.write(GOOD_CLIP.read_bytes())
    files, errors = list_audio(str(tmp_path), EXTS)
    assert [f.id for f in files] == ["p1/good.flac"]
    assert [(e.id, e.stage) for e in errors] == [("p1/caf\\xe9.flac", "discover")]
    assert "not valid UTF-8" in errors[0].error
    errors[0].model_dump_json()  # writable to the folder's errors file


def test_control_characters_are_refused(tmp_path):
    (tmp_path / "p1").mkdir()
    shutil.copy(GOOD_CLIP, tmp_path / "p1" / "good.flac")
    shutil.copy(GOOD_CLIP, tmp_path / "p1" / "bell\x07.flac")
    files, errors = list_audio(str(tmp_path), EXTS)
    assert [f.id for f in files] == ["p1/good.flac"]
    assert [e.id for e in errors] == ["p1/bell\\x07.flac"] and "control characters" in errors[0].error


def test_object_keys_that_would_escape_the_results_root_are_refused():
    """Regression: `p1/../../../../ESCAPED/x.flac` became an id and wrote outside the results root."""
    fs = fsspec.filesystem("memory")
    data = GOOD_CLIP.read_bytes()
    fs.pipe("/escape-test/p1/ok.flac", data)
    fs.pipe("/escape-test/p1/../../../../ESCAPED/x.flac", data)
    fs.pipe("/escape-test/p1//empty-segment.flac", data)
    listing = scan_audio("memory://escape-test", EXTS)
    assert [f.id for f in listing.files] == ["p1/ok.flac"]
    refused = {e.id: e.error for e in listing.errors + listing.refused}
    assert set(refused) == {"p1/../../../../ESCAPED/x.flac", "p1//empty-segment.flac"}
    assert all("segment" in why for why in refused.values())
    # their folders cannot be written, so they are reported in the run summary, not in a folder's file
    assert {e.id for e in listing.refused} == set(refused)


@pytest.mark.parametrize("bad", ["../x.flac", "/abs/x.flac", "a//b.flac", "a/", ".", "./a.flac", "a/./b.flac", "a/b\x00.flac", "a/\x7f.flac"])
def test_id_problem(bad):
    assert id_problem(bad)


def test_good_ids_pass():
    assert id_problem("p225/p225_001_mic2.flac") is None
    assert id_problem("spaced name/ünïcödé.flac") is None


def test_a_folder_named_like_an_errors_file_is_refused(tmp_path):
    """Regression: folder `x.errors` wrote x.errors.jsonl, which is folder x's errors file."""
    for rel in ["x/a.flac", "x.errors/b.flac"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(GOOD_CLIP, tmp_path / rel)
    listing = scan_audio(str(tmp_path), EXTS)
    assert [f.id for f in listing.files] == ["x/a.flac"]
    assert [e.id for e in listing.refused] == ["x.errors/b.flac"] and listing.errors == []
    assert "folder 'x''s errors file" in listing.refused[0].error


def test_a_mesh_of_sibling_symlinks_lists_each_real_folder_once(tmp_path):
    """Regression: three folders linking to each other turned 6 real files into 1,956 ids."""
    names = ["a", "b", "c"]
    for name in names:
        (tmp_path / name).mkdir()
        for i in range(2):
            os.link(GOOD_CLIP, tmp_path / name / f"{name}{i}.flac")
    for name in names:
        for other in names:
            if other != name:
                os.symlink(tmp_path / other, tmp_path / name / f"link-to-{other}")
    files, errors = list_audio(str(tmp_path), EXTS)
    assert sorted(f.id for f in files) == ["a/a0.flac", "a/a1.flac", "b/b0.flac", "b/b1.flac", "c/c0.flac", "c/c1.flac"]
    assert errors == []


def test_a_symlink_to_a_folder_outside_the_root_is_followed_once(tmp_path):
    (tmp_path / "outside").mkdir()
    os.link(GOOD_CLIP, tmp_path / "outside" / "x.flac")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "one")
    os.symlink(tmp_path / "outside", tmp_path / "root" / "two")
    files, _ = list_audio(str(tmp_path / "root"), EXTS)
    assert [f.id for f in files] == ["one/x.flac"]

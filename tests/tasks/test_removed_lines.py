"""No line leaves a folder's JSONL unreported (issue 20, case 2).

A merge that writes fewer ids than the folder's last merge wrote counts them (`removed`) and says
why per id. A file that is gone loses its line; a file still on the audio root that this run did
not list (a narrower `--extensions`, a listing that missed it) keeps its line while that line still
matches this run, and is removed, said so, once it would be a stale line.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

from tasks.discover import AudioRoot, list_audio
from tasks.merge import merge_folder
from tasks.records import OutputOptions
from tasks.storage import Store
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import expect_for, make_corpus, read_jsonl, run_steps, settings_for, write_clip
from tests.tasks.test_settled import planned_folders


def write_wav(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.1 * rng.standard_normal(6400)).astype(np.float32), 16_000, format="WAV")


def ids(store: Store, relative: str) -> list[str]:
    return [r["id"] for r in read_jsonl(store, relative)]


def test_lines_of_files_excluded_by_extensions_are_kept_and_gone_ones_removed_and_reported(tmp_path):
    """The issue's reproduction: p1 had three .wav lines (one dropped as flagged), p2 two; then
    p1/u4.flac is added and the run narrowed to `--extensions .flac --drop-flagged`."""
    audio, results = tmp_path / "audio", tmp_path / "results"
    for i in range(3):
        write_wav(audio / "p1" / f"w{i}.wav", i)
    for i in range(2):
        write_wav(audio / "p2" / f"w{i}.wav", 10 + i)
    with ContractService(flags={"w2.wav": ["repetition"]}) as service:
        settings = settings_for(audio, str(results), service.url, drop_flagged=True)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        dropped = OutputOptions(drop_flagged=True)
        run_steps(settings, store, expect, dropped)
        assert ids(store, "p1.jsonl") == ["p1/w0.wav", "p1/w1.wav"]
        assert ids(store, "p1.errors.jsonl") == ["p1/w2.wav"]

        write_clip(audio / "p1" / "u4.flac", 4)
        flac = settings.model_copy(update={"extensions": (".flac",)})
        sent = len(service.requests)
        narrowed = run_steps(flac, store, expect, dropped)
        assert service.requests[sent:] == ["u4.flac"]  # the .wav files are not redone, nor lost
        p1 = narrowed.folders["p1"]
        assert ids(store, "p1.jsonl") == ["p1/u4.flac", "p1/w0.wav", "p1/w1.wav"]
        assert ids(store, "p1.errors.jsonl") == ["p1/w2.wav"]  # its dropped clip stays reported
        assert (p1.removed, p1.kept, p1.lines, p1.files) == (0, 2, 3, 1)
        assert planned_folders(flac, expect)[0] == {"p1"}  # lines kept for unlisted files are rechecked each run

        (audio / "p1" / "w1.wav").unlink()  # really gone: its line goes, and the report says why
        again = run_steps(flac, store, expect, dropped).folders["p1"]
        assert ids(store, "p1.jsonl") == ["p1/u4.flac", "p1/w0.wav"]
        assert again.removed == 1 and again.kept == 1
        assert [(r.id, r.reason) for r in again.removed_ids] == [
            ("p1/w1.wav", "not discovered by this run: the file is gone from the audio root")]

        # Still there but no longer valid for this run (another language asked for): removed, never
        # kept as a stale line, and the reason says both why it was not listed and what differs.
        french = flac.model_copy(update={"language": "fr"})
        other = expect_for(french)
        stale = run_steps(french, store, other, dropped).folders["p1"]
        assert ids(store, "p1.jsonl") == ["p1/u4.flac"]
        assert {r.id for r in stale.removed_ids} == {"p1/w0.wav", "p1/w2.wav"} and stale.removed == 2
        reason = next(r.reason for r in stale.removed_ids if r.id == "p1/w0.wav")
        assert "excluded by --extensions (.flac)" in reason and "asks for fr" in reason, reason
        # The next run has nothing left to remove: each removal is reported once.
        assert run_steps(french, store, other, dropped).folders["p1"].removed == 0


def test_a_file_a_listing_missed_keeps_its_line_and_one_that_vanished_is_reported(tmp_path):
    """A transient listing (a sync in progress, a flaky mount): merge is given fewer files than
    its last merge wrote, while they are all still on the audio root."""
    audio, results = tmp_path / "audio", tmp_path / "results"
    make_corpus(audio, {"p1": 4})
    with ContractService() as service:
        settings = settings_for(audio, str(results), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        before = (results / "p1.jsonl").read_bytes()
        files, _ = list_audio(settings.audio_root, settings.extensions)
        root = AudioRoot(settings.audio_root, settings.extensions)
        missed = merge_folder("p1", files[:2], store, expect, audio=root)  # the listing saw two of four
    assert (missed.kept, missed.removed, missed.lines) == (2, 0, 4)
    assert (results / "p1.jsonl").read_bytes() == before and not missed.changed
    # Without an audio root to ask (a caller that gives none), nothing vanishes silently either.
    blind = merge_folder("p1", files[:3], store, expect)
    assert blind.removed == 1 and blind.removed_ids[0].id == "p1/p1_003.flac"
    assert blind.removed_ids[0].reason == "not discovered by this run"
    assert json.loads((results / "p1.jsonl").read_text().splitlines()[-1])["id"] == "p1/p1_002.flac"


def test_verify_content_sees_a_rewrite_that_kept_size_and_mtime(tmp_path):
    """On a local disk the identity is size + mtime in ns; a same-size rewrite with its times put
    back is invisible to it (documented), and seen with `verify_content` (sha256 of the bytes)."""
    audio, results = tmp_path / "audio", tmp_path / "results"
    write_wav(audio / "p1" / "a.wav", 1)
    write_wav(audio / "p1" / "b.wav", 2)
    with ContractService() as service:
        settings = settings_for(audio, str(results), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        first = {r["id"]: r for r in read_jsonl(store, "p1.jsonl")}
        target = audio / "p1" / "a.wav"
        stamp = os.stat(target)
        write_wav(target, 99)  # same length, same header: same size, other samples
        os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert os.stat(target).st_size == stamp.st_size

        sent = len(service.requests)
        run_steps(settings, store, expect)
        assert len(service.requests) == sent  # size + mtime cannot see it (README says so)
        verified = settings.model_copy(update={"verify_content": True})
        run = run_steps(verified, store, expect)
        # The first verified run redoes every file once (the source key gained a hash), then only changes.
        assert sorted(service.requests[sent:]) == ["a.wav", "b.wav"]
        assert run.stage("tokenise").done == 2
        sent = len(service.requests)
        run_steps(verified, store, expect)
        assert len(service.requests) == sent
        lines = {r["id"]: r for r in read_jsonl(store, "p1.jsonl")}
    assert lines["p1/a.wav"]["transcription"] != first["p1/a.wav"]["transcription"]
    assert lines["p1/b.wav"] == first["p1/b.wav"]


def test_removal_is_decided_per_source_file_so_segment_lines_are_ready(tmp_path):
    """Lines are compared by id, each id looked up by its source file: a long recording's segment
    lines (`x.flac#t=start,end`, issue 22) whose file was listed again with other cuts are removed
    as superseded, and one whose file is gone is removed as gone."""
    from tasks.merge import _recheck
    from tasks.records import source_id

    assert source_id("b/ch01.flac#t=12.340,27.100") == "b/ch01.flac" and source_id("b/x#t=1.flac") == "b/x#t=1.flac"
    write_clip(tmp_path / "b" / "still.flac", 1)
    root = AudioRoot(str(tmp_path), (".flac",))
    carried, removed = _recheck(
        ["b/ch01.flac#t=0.000,5.000", "b/gone.flac#t=0.000,5.000", "b/still.flac#t=1.000,2.000"],
        {"b/ch01.flac"}, root,
    )
    assert [r.id for r in removed] == ["b/ch01.flac#t=0.000,5.000", "b/gone.flac#t=0.000,5.000"]
    assert "no longer has this line" in removed[0].reason and "gone" in removed[1].reason
    assert list(carried) == ["b/still.flac#t=1.000,2.000"]
    assert carried["b/still.flac#t=1.000,2.000"][0].path == str(tmp_path / "b" / "still.flac")

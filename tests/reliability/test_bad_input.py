"""Bad input: every file ends as a correct JSONL line or an error line naming stage and reason.

The end-to-end test runs `audio-pipeline run` as a subprocess (real Prefect harness, real Dask
LocalCluster, real service) over a corpus of broken and odd files beside good ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import soundfile as sf

from tasks.discover import list_audio
from tasks.records import AudioFile, Batch, Failure, Provenance, SourceInfo, Tokens
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokenise_batches
from tasks.tokenisers import get_tokeniser
from tasks.transcribe import transcribe_files

# These tests call the stages directly: no service fingerprint, so nothing is reused.
NO_REUSE = Provenance(decode_fingerprint=None, language=None, tokenizer_settings={})
from tests.reliability.conftest import cli_env, read_results, run_cli
from tests.reliability.corpus import GOOD, build_bad_corpus, header_only_flac
from whisper_service.audio import decode_audio

EXTS = (".flac", ".wav")


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad-corpus")
    return root, build_bad_corpus(root)


# --- fast, no Prefect: the fixes in discovery and tokenisation ---


def test_discovery_follows_links_skips_loops_and_reports_what_it_cannot_read(bad_corpus):
    """Regression: fsspec types every symlink "other", so linked clips and folders vanished
    silently, and a broken link or FIFO named .flac was dropped without an error line."""
    root, expected = bad_corpus
    files, errors = list_audio(str(root), EXTS)
    ids = {f.id for f in files}
    assert "links/linked.flac" in ids  # a symlinked clip is a clip
    assert not any("/loop/" in i for i in ids)  # loop/loop -> loop is not followed
    assert {(e.id, e.stage) for e in errors} == {("links/broken.flac", "discover"), ("bad/fifo.flac", "discover")}
    assert "broken symbolic link" in next(e.error for e in errors if e.id == "links/broken.flac")
    assert ids | {e.id for e in errors} == set(expected)
    linked = next(f for f in files if f.id == "links/linked.flac")
    assert linked.source.size == GOOD[0].stat().st_size  # the target's size and mtime, not the link's


def test_symlinked_speaker_folder_is_listed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.flac").write_bytes(GOOD[0].read_bytes())
    (tmp_path / "corpus").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "corpus" / "p999")
    files, errors = list_audio(str(tmp_path / "corpus"), EXTS)
    assert [f.id for f in files] == ["p999/a.flac"] and errors == []


def _audio_file(path: Path, file_id: str) -> AudioFile:
    return AudioFile(id=file_id, path=str(path), source=SourceInfo(size=1, mtime="0"))


def test_undecodable_file_costs_only_itself_in_tokenisation(tmp_path):
    """Regression: a header-only FLAC (total_samples=0) made decode raise a plain ValueError
    ("array is too big"), which failed the whole tokenise shard: its good files lost tokens.
    Now decode reads it as a stream and finds no samples: a per-file decode error."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "bad.flac").write_bytes(header_only_flac())
    (tmp_path / "s" / "good.flac").write_bytes(GOOD[0].read_bytes())
    files = [_audio_file(tmp_path / "s" / n, f"s/{n}") for n in ("bad.flac", "good.flac")]
    store = Store(str(tmp_path / "results"))
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=store.url, tokenizer="simulated")
    report = tokenise_batches([Batch(folder="s", files=files)], settings, store, NO_REUSE)
    assert (report.done, report.failed) == (1, 1)
    bad = store.read_tokens("s/bad.flac")
    assert isinstance(bad, Failure) and bad.stage == "decode" and "no samples" in bad.error
    assert isinstance(store.read_tokens("s/good.flac"), Tokens)


def test_file_unreadable_after_discovery_is_a_decode_error_in_both_stages(tmp_path):
    """A file that vanishes (or turns into a folder) after discovery: both stages record why."""
    (tmp_path / "s" / "now_a_folder.flac").mkdir(parents=True)  # reading it: IsADirectoryError, even as root
    files = [_audio_file(tmp_path / "s" / "gone.flac", "s/gone.flac"),
             _audio_file(tmp_path / "s" / "now_a_folder.flac", "s/now_a_folder.flac")]
    store = Store(str(tmp_path / "results"))
    # no service is listening there: the read fails first, so it is never contacted
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=store.url, tokenizer="simulated",
                                service_url="http://127.0.0.1:9")
    assert transcribe_files(files, settings, store, NO_REUSE).failed == 2
    assert tokenise_batches([Batch(folder="s", files=files)], settings, store, NO_REUSE).failed == 2
    for f in files:
        for record in (store.read_transcription(f.id), store.read_tokens(f.id)):
            assert isinstance(record, Failure) and record.stage == "decode", record


def test_unreadable_file_chmod_000(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root reading a file; the vanished-file "
                    "and folder-named-.flac cases above exercise the same read-failure path")
    path = tmp_path / "s" / "locked.flac"
    path.parent.mkdir()
    path.write_bytes(GOOD[0].read_bytes())
    path.chmod(0)
    files, errors = list_audio(str(tmp_path), EXTS)
    assert [f.id for f in files] == ["s/locked.flac"] and errors == []
    store = Store(str(tmp_path / "results"))
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=store.url, tokenizer="simulated",
                                service_url="http://127.0.0.1:9")
    transcribe_files(files, settings, store, NO_REUSE)
    tokenise_batches([Batch(folder="s", files=files)], settings, store, NO_REUSE)
    for record in (store.read_transcription("s/locked.flac"), store.read_tokens("s/locked.flac")):
        assert isinstance(record, Failure) and record.stage == "decode" and "ermission" in record.error


# --- end to end through the CLI ---


def expected_line(path: Path, service_url: str, tokeniser) -> dict:
    """What the pipeline must write for one good file: the service's text, rpq's tokens."""
    data = path.read_bytes()
    response = httpx.post(f"{service_url}/transcribe", files={"file": (path.name, data)}, timeout=120)
    response.raise_for_status()
    tokens = tokeniser.tokenise([decode_audio(data, tokeniser.sample_rate)])[0]
    return {"transcription": response.json()["text"], "token_array": [int(t) for t in tokens]}


@pytest.mark.slow
def test_bad_corpus_end_to_end_through_the_cli(bad_corpus, whisper_service_url, prefect_api_url, dask_cluster,
                                               tmp_path):
    root, expected = bad_corpus
    results = tmp_path / "results"
    code, output = run_cli(
        ["run", str(root), "--results", str(results), "--service-url", whisper_service_url,
         "--batch-size", "4", "--dask-address", dask_cluster["address"],
         "--no-segment"],  # the 60 s file goes whole through the service's long-clip lane (segments: test_longform_stages)
        cli_env(prefect_api_url, AUDIO_PIPELINE_HTTP_BACKOFF_S="0.1"), tmp_path / "cli.log", timeout_s=420,
    )
    lines, errors = read_results(results)
    failing = {i for i, outcome in expected.items() if outcome != "line"}
    assert code == 1, output
    assert f"{len(failing)} file(s) failed" in output

    # every file is accounted for exactly once: a line, or error lines (never both, never neither)
    assert set(lines) == {i for i, outcome in expected.items() if outcome == "line"}
    assert {e["id"] for e in errors} == failing
    for e in errors:
        assert e["stage"] in expected[e["id"]], e
        assert e["error"].strip(), e
    by_id = {i: [e for e in errors if e["id"] == i] for i in failing}
    assert "empty" in " ".join(e["error"] for e in by_id["bad/empty.flac"])
    assert all("not readable audio" in e["error"] for e in by_id["bad/random_bytes.flac"] + by_id["bad/truncated.flac"])
    assert "not a regular file" in by_id["bad/fifo.flac"][0]["error"]
    # errors go to the failing file's own folder
    assert {e["id"] for e in map(json.loads, (results / "bad.errors.jsonl").read_text().splitlines())} == {
        i for i in failing if i.startswith("bad/")}
    assert (results / "nested" / "deeper" / "still.jsonl").exists()
    assert (results / "spaced name.jsonl").exists()
    assert not list(results.rglob("*.part"))

    # good files are unaffected by their bad neighbours: exactly what the service and rpq give alone
    rpq = get_tokeniser("rpq", device="cpu")
    for file_id in sorted(lines):
        record = lines[file_id]
        if file_id == "long/sixty_seconds.flac":  # one request of ~60 s is enough: check shape only
            seconds = sf.info(root / file_id).duration
            assert seconds >= 60 and len(record["transcription"].split()) > 60
            assert abs(len(record["token_array"]) - 25 * seconds) <= 1
            continue
        want = expected_line(root / file_id, whisper_service_url, rpq)
        assert record == {"id": file_id, **want}, file_id
    assert lines["odd/silence.flac"]["transcription"] == ""
    assert lines["odd/short_0.1s.flac"]["token_array"] and len(lines["odd/short_0.1s.flac"]["token_array"]) <= 3
    assert lines["odd/wav_named.flac"]["transcription"]
    assert lines["links/linked.flac"]["token_array"] == lines[f"good/{GOOD[0].name}"]["token_array"]

"""results/manifest.json: what it records, and that its token description matches real tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tasks.records import RunSummary
from tasks.settings import PipelineSettings
from tasks.tokenisers import describe_tokens, get_tokeniser

HEALTH = {
    "status": "ok", "engine": "faster-whisper", "model": "tiny.en", "device": "cpu",
    "weights_sha256": "f" * 64, "decode": {"beam_size": 1, "temperature": [0.0, 0.2]}, "fingerprint": "ab12",
}


def _summary(root: str) -> RunSummary:
    return RunSummary(folders=2, files=10, lines=8, failed=2, audio_hours=0.01, wall_seconds=3.0,
                      files_per_second=3.3, results_root=root, new=4, flagged=1)


def _chirp(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)


def test_manifest_records_service_tokeniser_counts_and_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = PipelineSettings(audio_root="corpus", results_root="out", tokenizer="simulated",
                                language="en", with_quality=True)
    shown = write_manifest("out", settings=settings, health=HEALTH, summary=_summary("out"), run_id="1234-abcd",
                           tokenizer_settings=get_tokeniser("simulated", device="cpu").settings)
    assert shown == str(tmp_path / "out" / MANIFEST_NAME)
    raw = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert raw["schema_version"] == 1 and raw["run_id"] == "1234-abcd"
    assert raw["audio_root"] == str(tmp_path / "corpus")  # a relative root is pinned to the run's cwd
    assert raw["service"] == {
        "url": "http://localhost:8000", "engine": "faster-whisper", "model": "tiny.en", "device": "cpu",
        "weights_sha256": "f" * 64, "decode": {"beam_size": 1, "temperature": [0.0, 0.2]},
        "fingerprint": "ab12", "language": "en",
    }
    assert raw["counts"] == {"folders": 2, "files": 10, "lines": 8, "failed": 2, "flagged": 1, "new": 4}
    assert raw["output"]["fields"] == ["id", "transcription", "token_array", "quality"]
    token = raw["tokeniser"]
    assert token["settings"] == get_tokeniser("simulated", device="cpu").settings
    assert (token["tokens_per_second"], token["codebook_size"], token["n_codebooks"]) == (25.0, 8192, 1)
    assert (token["layout"], token["value_dtype"]) == ("flat", "uint16")
    manifest = read_manifest("out")
    assert manifest is not None and manifest.tokeniser.name == "simulated"
    assert manifest.audio_path("p225/a.flac") == f"{tmp_path}/corpus/p225/a.flac"


def test_an_older_service_leaves_its_unknown_fields_null(tmp_path: Path) -> None:
    settings = PipelineSettings(audio_root=str(tmp_path / "a"), results_root=str(tmp_path / "r"), tokenizer="simulated")
    write_manifest(str(tmp_path / "r"), settings=settings, health={"status": "ok", "model": "tiny.en"},
                   summary=_summary(str(tmp_path / "r")), run_id=None,
                   tokenizer_settings=get_tokeniser("simulated", device="cpu").settings)
    manifest = read_manifest(str(tmp_path / "r"))
    assert manifest.service.model == "tiny.en"
    assert manifest.service.engine is None and manifest.service.fingerprint is None and manifest.run_id is None


def test_read_manifest_absent_is_none_and_garbage_names_the_file(tmp_path: Path) -> None:
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / MANIFEST_NAME).write_text('{"schema_version": 1}')
    with pytest.raises(ValueError, match=rf"{tmp_path}/manifest.json is not a valid manifest"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("name", ["rpq", "simulated"])
@pytest.mark.parametrize("seconds", [3.0, 1.37])
def test_manifest_token_rate_matches_the_tokens_produced(tmp_path: Path, name: str, seconds: float) -> None:
    """The real tokeniser on a synthetic clip of known length gives rate x length tokens."""
    tokeniser = get_tokeniser(name, device="cpu")
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=str(tmp_path / "r"), tokenizer=name)
    write_manifest(str(tmp_path / "r"), settings=settings, health=HEALTH, summary=_summary("r"), run_id=None,
                   tokenizer_settings=tokeniser.settings)
    spec = read_manifest(str(tmp_path / "r")).tokeniser
    assert spec == tokeniser.describe()
    clip = _chirp(seconds, spec.sample_rate)
    tokens = tokeniser.tokenise([clip])[0]
    assert len(tokens) == int(spec.tokens_per_second * seconds) == spec.tokens_for_samples(clip.size)
    assert max(tokens) < spec.codebook_size <= np.iinfo(spec.value_dtype).max + 1


def test_encodec_is_described_frame_major_from_its_bandwidth() -> None:
    settings = {"name": "encodec", "version": 1, "sample_rate": 24_000, "bandwidth": 6.0, "n_q": 8,
                "layout": "frame-major", "weights_sha256": "0" * 64}
    spec = describe_tokens(settings)
    assert (spec.frames_per_second, spec.n_codebooks, spec.tokens_per_second) == (75.0, 8, 600.0)
    assert (spec.codebook_size, spec.layout, spec.value_dtype) == (1024, "interleaved frame-major", "uint16")
    assert spec.tokens_for_samples(24_000) == 600 and spec.tokens_for_samples(24_001) == 608  # last frame padded
    with pytest.raises(ValueError, match="unknown name"):
        describe_tokens({"name": "wav2vec"})
    with pytest.raises(ValueError, match="lack 'n_q'"):
        describe_tokens({k: v for k, v in settings.items() if k != "n_q"})


def test_the_run_names_its_tokeniser_and_nothing_on_disk_overrides_it(tmp_path: Path) -> None:
    """No guessing from the first line's intermediate: that may be a stale run's tokens."""
    from tasks.records import SourceInfo, Tokens
    from tasks.storage import Store

    stale = get_tokeniser("rpq", device="cpu", seed=7, codebook_size=4096).settings
    store = Store(str(tmp_path / "r"))
    store.write_record("tokens", Tokens(id="p1/a.flac", token_array=[1], tokenizer="rpq", tokenizer_settings=stale,
                                        source=SourceInfo(size=1, mtime="0")))
    store.write_bytes("p1.jsonl", b'{"id": "p1/a.flac", "transcription": "a", "token_array": [1]}\n')
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=str(tmp_path / "r"), tokenizer="rpq")
    with pytest.raises(TypeError, match="tokenizer_settings"):
        write_manifest(str(tmp_path / "r"), settings=settings, health={}, summary=_summary("r"), run_id=None)
    current = get_tokeniser("rpq", device="cpu").settings
    write_manifest(str(tmp_path / "r"), settings=settings, health={}, summary=_summary("r"), run_id=None,
                   tokenizer_settings=current)
    spec = read_manifest(str(tmp_path / "r")).tokeniser
    assert spec.settings == current != stale and spec.codebook_size == current["codebook_size"] != 4096

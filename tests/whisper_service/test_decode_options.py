"""Decode options: settings -> one frozen object -> a stable fingerprint; weights by content."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from whisper_service.decode_options import DecodeKnobs, DecodeOptions
from whisper_service.engines import pick_engine
from whisper_service.engines.base import Segment, check_options
from whisper_service.engines.models import weights_sha256
from whisper_service.settings import WhisperServiceSettings
from whisper_service.subtitles import to_srt, to_vtt

WEIGHTS = "ab" * 32

# The fingerprint of the default options for fixed weights. It changes when a default, a field or
# DECODER_VERSION changes; update it deliberately (that change invalidates every stored transcript).
GOLDEN_JSON = (
    '{"beam_size":5,"best_of":5,"compression_ratio_threshold":2.4,"compute_type":"int8",'
    '"converter_version":null,"decoder_version":3,"engine":"faster-whisper","initial_prompt":null,'
    '"language":null,"log_prob_threshold":-1.0,"model":"tiny.en","no_speech_threshold":0.6,'
    '"no_timestamps_over_s":10.0,"temperatures":[0.0,0.2,0.4,0.6,0.8,1.0],"weights_sha256":"' + WEIGHTS + '"}'
)
GOLDEN_FINGERPRINT = "fe7c6b72c05709c306313399b2d5edbbe486d34591790134a09ffa519902242a"


def build(knobs: DecodeKnobs | None = None, **identity: str) -> DecodeOptions:
    values = {"engine": "faster-whisper", "model": "tiny.en", "weights_sha256": WEIGHTS, "compute_type": "int8"}
    return DecodeOptions.build(knobs or DecodeKnobs(), **(values | identity))  # type: ignore[arg-type]


def test_defaults_are_whispers_safeguards():
    options = build()
    assert options.temperatures == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert (options.compression_ratio_threshold, options.log_prob_threshold) == (2.4, -1.0)
    assert options.no_speech_threshold == 0.6
    assert options.beam_size == 5  # faster-whisper's default
    assert build(engine="openai-whisper", compute_type="float32").beam_size == 1
    assert build(DecodeKnobs(beam_size=3), engine="openai-whisper").beam_size == 3


def test_fingerprint_is_stable_and_golden():
    options = build()
    assert len(options.fingerprint) == 64
    assert options.fingerprint == build().fingerprint
    assert options.canonical_json() == GOLDEN_JSON
    assert options.fingerprint == GOLDEN_FINGERPRINT, options.canonical_json()


@pytest.mark.parametrize(
    "change",
    [
        {"engine": "openai-whisper"},
        {"weights_sha256": "cd" * 32},
        {"compute_type": "float32"},
        {"model": "tiny"},
    ],
)
def test_identity_changes_the_fingerprint(change: dict[str, str]):
    assert build(**change).fingerprint != build().fingerprint


@pytest.mark.parametrize(
    "knobs",
    [
        {"beam_size": 1},
        {"temperatures": (0.0,)},
        {"compression_ratio_threshold": 2.0},
        {"log_prob_threshold": None},
        {"no_speech_threshold": 0.5},
        {"language": "en"},
        {"initial_prompt": "Harvard sentences."},
        {"best_of": 2},
    ],
)
def test_every_knob_changes_the_fingerprint(knobs: dict[str, object]):
    assert build(DecodeKnobs(**knobs)).fingerprint != build().fingerprint  # type: ignore[arg-type]


def test_request_overrides_make_new_hashable_options():
    options = build()
    assert options.for_request() is options
    assert options.for_request(temperature=0.0) is options  # OpenAI: 0 means "the ladder"
    hot = options.for_request(temperature=0.7)
    prompted = options.for_request(prompt="  The birch canoe. ")
    assert hot.temperatures == (0.7,) and not hot.has_fallback
    assert prompted.initial_prompt == "The birch canoe."
    assert len({options, hot, prompted, options.for_request(temperature=0.7)}) == 3
    assert hot.fingerprint != options.fingerprint != prompted.fingerprint
    with pytest.raises(ValidationError):
        options.for_request(temperature=3.0)


def test_options_are_frozen():
    with pytest.raises(ValidationError):
        build().beam_size = 2  # type: ignore[misc]


def test_settings_build_the_knobs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WHISPER_TEMPERATURES", "[0.0, 0.5]")
    monkeypatch.setenv("WHISPER_BEAM_SIZE", "2")
    monkeypatch.setenv("WHISPER_LANGUAGE", "EN")
    knobs = WhisperServiceSettings().decode_knobs()
    assert (knobs.temperatures, knobs.beam_size, knobs.language) == ((0.0, 0.5), 2, "en")
    assert WhisperServiceSettings().engine == "auto"
    with pytest.raises(ValidationError, match="ascending"):
        WhisperServiceSettings(temperatures=(0.4, 0.2))
    with pytest.raises(ValidationError, match="beam_size"):
        WhisperServiceSettings(beam_size=0)


def test_options_for_other_weights_are_refused():
    class Loaded:
        options = build()

    assert check_options(Loaded(), None) is Loaded.options  # type: ignore[arg-type]
    assert check_options(Loaded(), build(DecodeKnobs(beam_size=1))).beam_size == 1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="given to faster-whisper"):
        check_options(Loaded(), build(weights_sha256="cd" * 32))  # type: ignore[arg-type]


def test_weights_are_identified_by_content(tmp_path: Path):
    one, two, other = tmp_path / "ct2", tmp_path / "elsewhere" / "ct2", tmp_path / "other"
    for d in (one, two, other):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (one / "model.bin").write_bytes(b"weights A")
    (two / "model.bin").write_bytes(b"weights A")
    (other / "model.bin").write_bytes(b"weights B")
    assert weights_sha256(one) == weights_sha256(two) != weights_sha256(other)
    (two / "model.bin").write_bytes(b"weights B!")  # rewritten in place: hashed again
    assert weights_sha256(two) != weights_sha256(one)
    checkpoint = tmp_path / "a.pt"
    shutil.copy(one / "model.bin", checkpoint)
    assert len(weights_sha256(checkpoint)) == 64


def test_auto_engine_by_hardware():
    assert pick_engine("auto", "cpu") == "faster-whisper"
    assert pick_engine("auto", "cuda") == "openai-whisper"
    assert pick_engine("openai-whisper", "cpu") == "openai-whisper"


def test_subtitles():
    segments = [Segment(0.0, 2.5, "Hello there."), Segment(2.5, 3661.0015, "Bye.")]
    assert to_srt(segments) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n00:00:02,500 --> 01:01:01,002\nBye.\n"
    )
    assert to_vtt(segments[:1]) == "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n"
    assert (to_srt([]), to_vtt([])) == ("", "WEBVTT\n")

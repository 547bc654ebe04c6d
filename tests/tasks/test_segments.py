"""Segmentation of long recordings (issue 22): real FLAC from espeak-ng, real Silero VAD."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from tasks.audio_stream import iter_blocks, open_source, probe, read_span, span_flac
from tasks.records import AudioFile, Segment, SourceInfo, segment_id, split_segment_id
from tasks.segments import FRAME_S, cut_segments, segment_audio, segment_source, segmentation_fingerprint, speech_regions
from tasks.settings import PipelineSettings, SegmentOptions
from tasks.vad import speech_probabilities
from tests.fixtures.longform import make_long_recording
from whisper_service.audio import AudioDecodeError, decode_audio

OPTIONS = SegmentOptions()


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    return {
        "mono16k": make_long_recording(root / "book/ch01.flac", 75, seed=1),
        "stereo44k": make_long_recording(root / "book/ch02.flac", 50, rate=44_100, channels=2, seed=2,
                                         voice="en-us+f3", first_sentence=7),
        # Pauses of 40-80 ms: no pause long enough to end a region, so the cutter must split speech.
        "unbroken": make_long_recording(root / "talk/fast.flac", 70, seed=3, pauses=(0.04, 0.08)),
    }


def _file(rec) -> AudioFile:
    return AudioFile(id=rec.path.name, path=str(rec.path), source=SourceInfo(size=rec.path.stat().st_size, mtime="0"))


def _check_bounds(segments: list[Segment], duration: float, options: SegmentOptions = OPTIONS) -> None:
    assert segments, "no segment found in a file full of speech"
    for s in segments:
        assert 0.0 <= s.start < s.end <= duration + 1e-9
        assert s.end - s.start <= options.max_segment_s + 1e-9
        assert s.start == round(s.start, 3) and s.end == round(s.end, 3)
    for a, b in zip(segments, segments[1:], strict=False):
        assert a.end <= b.start, f"overlap: {a} then {b}"


def test_streaming_vad_equals_faster_whisper_on_the_whole_file(recordings):
    """Block by block at 44.1 kHz stereo: the same probabilities as faster-whisper's VAD on the
    whole decoded file (the LSTM state and context carried across blocks)."""
    from faster_whisper.vad import get_vad_model

    rec = recordings["stereo44k"]
    with open_source(str(rec.path)) as f:
        probs, samples = speech_probabilities(iter_blocks(f, block_frames=40_000))
    audio = decode_audio(rec.path.read_bytes())
    assert samples == len(audio)
    whole = get_vad_model()(np.pad(audio, (0, 512 - len(audio) % 512))).reshape(-1)
    np.testing.assert_allclose(probs, whole[: len(probs)], atol=1e-6)


@pytest.mark.parametrize("name", ["mono16k", "stereo44k"])
def test_every_sentence_lies_whole_in_one_segment(recordings, name):
    """Cuts fall in pauses: no sentence is split, none is left out, bounds hold."""
    rec = recordings[name]
    listing = segment_source(_file(rec), OPTIONS)
    _check_bounds(listing.segments, listing.duration)
    assert abs(listing.duration - rec.duration) < 0.01
    for start, end, text in rec.sentences:
        holders = [s for s in listing.segments if s.start <= start + 0.05 and end - 0.05 <= s.end]
        assert len(holders) == 1, f"{text!r} ({start:.2f}-{end:.2f}) not inside one of {listing.segments}"
    # Several sentences per segment, most segments within the target lengths.
    assert len(listing.segments) < len(rec.sentences)
    assert all(s.duration >= OPTIONS.min_segment_s for s in listing.segments[:-1])


def test_unbroken_speech_is_split_below_the_limit_and_nothing_is_lost(recordings):
    rec = recordings["unbroken"]
    options = SegmentOptions(min_segment_s=5.0, max_segment_s=15.0)
    listing = segment_source(_file(rec), options)
    _check_bounds(listing.segments, listing.duration, options)
    assert len(listing.segments) >= 5
    # Every 20 ms frame of the recording louder than -40 dBFS (speech) lies inside a segment.
    audio, rate = sf.read(rec.path, dtype="float32")
    frame = rate // 50
    rms = np.sqrt((audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 10 ** (-40 / 20)) * 0.02
    covered = np.zeros(len(loud), bool)
    for s in listing.segments:
        covered |= (loud + 0.01 >= s.start) & (loud + 0.01 <= s.end)  # frame centres
    assert covered.all(), f"speech lost at {loud[~covered][:10]} s"


def test_segmentation_is_deterministic_and_block_size_free(recordings):
    rec = recordings["mono16k"]
    first = segment_source(_file(rec), OPTIONS)
    assert segment_source(_file(rec), OPTIONS) == first
    with open_source(str(rec.path)) as f:
        probs, samples = speech_probabilities(iter_blocks(f, block_frames=3_001))
    assert segment_audio(probs, round(samples / 16_000, 3), OPTIONS) == first.segments


def test_cutter_ends_segments_in_the_longest_pause():
    """Synthetic probabilities: 2 s speech units; the pause after unit 3 is the longest that fits."""
    options = SegmentOptions(min_segment_s=3.0, max_segment_s=12.0, pad_s=0.0, max_pause_s=5.0)
    w = lambda s: int(round(s / FRAME_S))  # noqa: E731
    pauses = [0.3, 0.4, 1.2, 0.5, 0.3, 0.6, 0.3]  # after units 0..6
    probs, t = [], 0.0
    for pause in [*pauses, 0.0]:
        probs += [0.9] * w(2.0) + [0.05] * w(pause)
        t += 2.0 + pause
    probs = np.array(probs, np.float32)
    segments = segment_audio(probs, len(probs) * FRAME_S, options)
    assert len(segments) == 2
    cut = segments[0].end
    assert abs(cut - (3 * 2.0 + 0.3 + 0.4)) < 0.15  # unit 2 ends before the 1.2 s pause


def test_a_long_pause_always_ends_a_segment():
    options = SegmentOptions(min_segment_s=3.0, max_segment_s=28.0, pad_s=0.2, max_pause_s=2.0)
    w = lambda s: int(round(s / FRAME_S))  # noqa: E731
    probs = np.array([0.9] * w(2) + [0.0] * w(2.5) + [0.9] * w(2) + [0.0] * w(1), np.float32)
    segments = segment_audio(probs, len(probs) * FRAME_S, options)
    assert [(s.start, s.end) for s in segments] == [(0.0, 2.176), (4.288, 6.656)]  # 62-window units, 6-window pads


def test_no_speech_gives_no_segments():
    assert segment_audio(np.full(1000, 0.02, np.float32), 32.0, OPTIONS) == []
    assert speech_regions(np.empty(0, np.float32), OPTIONS) == []


def test_fingerprint_follows_cutting_options_only():
    base = segmentation_fingerprint(OPTIONS)
    assert segmentation_fingerprint(SegmentOptions(segment_over_s=600, no_segment=True)) == base
    assert segmentation_fingerprint(SegmentOptions(max_segment_s=25)) != base
    assert segmentation_fingerprint(SegmentOptions(pad_s=0.1)) != base


def test_options_refuse_impossible_lengths():
    with pytest.raises(ValueError, match="30"):
        SegmentOptions(max_segment_s=31)
    with pytest.raises(ValueError, match="below"):
        SegmentOptions(min_segment_s=20, max_segment_s=10)
    settings = PipelineSettings(audio_root="/a", segmentation={"segment_over_s": 60})
    assert settings.segmentation.segment_over_s == 60


def test_probe_and_read_span(recordings):
    rec = recordings["stereo44k"]
    info = probe(str(rec.path))
    assert (info.sample_rate, info.channels) == (44_100, 2)
    assert abs(info.duration - rec.duration) < 0.001
    with open_source(str(rec.path)) as f:
        span, rate, channels, clipped = read_span(f, 10.0, 20.0)
    assert (rate, channels, clipped) == (44_100, 2, 0.0)
    whole = decode_audio(rec.path.read_bytes())
    assert abs(len(span) - 160_000) <= 1
    middle = slice(1000, 159_000)  # resampler edges differ: compare the inside
    np.testing.assert_allclose(span[middle], whole[160_000:320_000][middle], atol=2e-3)
    decoded, rate = sf.read(__import__("io").BytesIO(span_flac(span)), dtype="float32")
    assert rate == 16_000 and len(decoded) == len(span)


def test_undecodable_file_is_a_decode_error(tmp_path):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC" + b"\x00" * 200)
    f = AudioFile(id="bad.flac", path=str(bad), source=SourceInfo(size=204, mtime="0"))
    with pytest.raises(AudioDecodeError, match="not readable audio"):
        segment_source(f, OPTIONS)
    with pytest.raises(AudioDecodeError):
        probe(str(bad))


def test_segment_ids_are_media_fragments():
    line = segment_id("book/ch01.flac", 12.34, 27.1)
    assert line == "book/ch01.flac#t=12.340,27.100"
    assert split_segment_id(line) == ("book/ch01.flac", 12.34, 27.1)
    assert split_segment_id("p225/p225_001_mic2.flac") is None
    assert Segment(start=12.34, end=27.1).line_id("book/ch01.flac") == line


def test_a_long_file_without_speech_is_reported_not_dropped(tmp_path):
    """No segment at all: a `quality` record under the file's id (listed, not failed), and merge's
    expansion keeps the file itself so that record becomes its errors line."""
    from tasks.long_plan import LongItem, expand
    from tasks.records import Failure
    from tasks.segments import segment_files
    from tasks.storage import Store

    path = tmp_path / "audio" / "room" / "silence.flac"
    path.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).normal(0, 1e-3, 40 * 16_000).astype(np.float32)
    sf.write(path, noise, 16_000, format="FLAC")
    f = AudioFile(id="room/silence.flac", path=str(path), source=SourceInfo(size=path.stat().st_size, mtime="0"))
    store = Store(str(tmp_path / "results"))
    report = segment_files([f], OPTIONS, store)
    assert (report.done, report.failed) == (1, 0)
    record = store.read_transcription(f.id)
    assert isinstance(record, Failure) and record.stage == "quality" and "no speech" in record.error
    files, spans = expand([f], [LongItem(id=f.id, start=0, end=41)], store, OPTIONS, whole=True)
    assert files == [f] and spans == {}


def test_files_cut_side_by_side_give_each_file_its_own_list(recordings, tmp_path, monkeypatch):
    """`segment_files` runs several files' VADs at once (threads); each list is the one that file
    gets alone, the report counts each file once, and a broken file among them costs only itself."""
    from tasks import segments
    from tasks.records import Failure, SegmentList
    from tasks.segments import segment_files, segment_list_path
    from tasks.storage import Store

    monkeypatch.setattr(segments, "vad_threads", lambda: 3)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"fLaC" + b"\x00" * 200)
    broken = AudioFile(id="book/bad.flac", path=str(bad), source=SourceInfo(size=204, mtime="0"))
    good = [_file(recordings[name]) for name in ("mono16k", "stereo44k", "unbroken")]
    store = Store(str(tmp_path / "results"))
    report = segment_files([good[0], broken, *good[1:]], OPTIONS, store)
    assert (report.done, report.failed, report.reused) == (3, 1, 0)
    for f in good:
        stored = SegmentList.model_validate_json(store.read_bytes(segment_list_path(f.id)))
        assert stored.segments == segment_source(f, OPTIONS).segments
    failure = store.read_transcription(broken.id)
    assert isinstance(failure, Failure) and failure.stage == "decode" and "not readable audio" in failure.error
    again = segment_files([good[0], broken, *good[1:]], OPTIONS, store)
    assert (again.done, again.failed, again.reused) == (0, 1, 3)

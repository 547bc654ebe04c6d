"""The faster-whisper engine decodes a short clip as faster-whisper's own loop does, and the
throughput choices (fallback on the kept encoder output, concurrent engine calls, batcher
workers) change no text. Real tiny.en weights, real demo audio."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.whisper_service.conftest import DemoClip
from whisper_service.audio import decode_audio
from whisper_service.batching import Batcher
from whisper_service.decode_options import DecodeKnobs
from whisper_service.engines import default_batch_size, default_workers, load_engine
from whisper_service.engines.base import Transcript
from whisper_service.engines.faster_whisper import FasterWhisperEngine
from whisper_service.engines.models import bundled_ct2_dir
from whisper_service.engines.seek import FRAMES_PER_SECOND

BEAM5_NO_FALLBACK = DecodeKnobs(temperatures=(0.0,))  # deterministic: no sampling
# "Glue the sheet to the dark blue background." by espeak-ng en-029 at 170 wpm: greedy loops on it.
LOOP_CLIP = Path(__file__).parent / "data" / "loop_en029_170wpm.flac"


@pytest.fixture(scope="module")
def engine() -> Iterator[FasterWhisperEngine]:
    """Two workers, one thread each: calls may overlap (the CPU default on 2+ cores)."""
    loaded = FasterWhisperEngine(bundled_ct2_dir(), "cpu", BEAM5_NO_FALLBACK, workers=2, cpu_threads=1)
    yield loaded
    loaded.close()


def test_short_clips_decode_as_faster_whisper_transcribe(engine: FasterWhisperEngine, demo_clips: list[DemoClip]):
    """Batched, the engine's text is the text of `WhisperModel.transcribe(beam_size=5)` (the loop
    a user writes) for each clip: same prompt, timestamp rules, suppression and beam."""
    model = engine._loaded()
    clips = demo_clips[:4]
    ours = [t.text for t in engine.transcribe([c.audio for c in clips])]
    theirs = [
        "".join(s.text for s in model.transcribe(c.audio, beam_size=5, temperature=[0.0])[0]).strip()
        for c in clips
    ]
    assert ours == theirs
    assert all(ours)


@pytest.fixture(scope="module")
def stops_early(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """21.2 s of read speech (five Harvard sentences, espeak-ng en-us+f3) on which tiny.en's first
    window stops after the fourth: it ends on a timestamp pair at 17 s, and `transcribe()` goes
    on from there. The span the segmenter cut from bench/longform.py's lecture02 (issue 22)."""
    from tests.fixtures.longform import make_long_recording

    rec = make_long_recording(tmp_path_factory.mktemp("long") / "l2.flac", 115, voice="en-us+f3", speed=130,
                              seed=32, first_sentence=13)
    audio = decode_audio(rec.path.read_bytes())
    return audio[int(91.20 * 16_000):int(112.38 * 16_000)]


def test_a_decode_that_stops_early_goes_on_in_a_next_window_as_transcribe_does(stops_early: np.ndarray):
    """The last sentence ("Adding fast leads to wrong sums.") lies after the point where the first
    window's decode stopped. Decoding only that window lost it on 2 of 7 segments of a lecture;
    the engine now looks again from the last timestamp, prompted with the text so far, and its
    text is the loop's. Batched with a clip that needs one window, so rounds are per clip."""
    knobs = DecodeKnobs(temperatures=(0.0,), no_timestamps_over_s=None)
    engine = FasterWhisperEngine(bundled_ct2_dir(), "cpu", knobs, cpu_threads=2)
    model = engine._loaded()
    loop = list(model.transcribe(stops_early, beam_size=5, temperature=[0.0])[0])
    assert len({s.seek for s in loop}) >= 2  # the loop itself needed a second window here
    short = stops_early[: 4 * 16_000]
    ours, alone = engine.transcribe([stops_early, short])
    assert ours.text == "".join(s.text for s in loop).strip()
    assert "sums" in ours.text.split()[-1]
    assert [(s.start, s.end) for s in ours.segments] == [(round(s.start, 3), round(s.end, 3)) for s in loop]
    assert alone.text == engine.transcribe([short])[0].text
    later = [s for s in loop if s.seek > 0]
    assert later and later[0].start == later[0].seek / FRAMES_PER_SECOND


def test_clips_over_the_timestamp_limit_decode_as_the_batched_pipeline_does(stops_early: np.ndarray):
    """A long recording's segments (over `no_timestamps_over_s`) decode without timestamp tokens,
    as faster-whisper's BatchedInferencePipeline decodes its VAD chunks: one window, the text of
    `transcribe(without_timestamps=True)`. Shorter clips keep their timestamps."""
    knobs = DecodeKnobs(temperatures=(0.0,), no_timestamps_over_s=10.0)
    engine = FasterWhisperEngine(bundled_ct2_dir(), "cpu", knobs, cpu_threads=2)
    model = engine._loaded()
    plain = "".join(s.text for s in model.transcribe(
        stops_early, beam_size=5, temperature=[0.0], without_timestamps=True)[0]).strip()
    short = stops_early[: 4 * 16_000]
    stamped = "".join(s.text for s in model.transcribe(short, beam_size=5, temperature=[0.0])[0]).strip()
    assert [t.text for t in engine.transcribe([stops_early, short])] == [plain, stamped]


def test_concurrent_calls_give_the_same_text_as_one_call(engine: FasterWhisperEngine, demo_clips: list[DemoClip]):
    audio = [c.audio for c in demo_clips[:4]]
    together = [t.text for t in engine.transcribe(audio)]
    with ThreadPoolExecutor(2) as pool:
        halves = list(pool.map(engine.transcribe, [audio[:2], audio[2:]]))
    assert [t.text for half in halves for t in half] == together


def test_fallback_decodes_on_the_first_encoder_output():
    """Clips that fail the thresholds are re-decoded at the next temperature without a second
    encoder pass (the 30 s window costs as much again on a CPU). A log-prob threshold of 0 fails
    every decode, so the speech clip surely climbs the ladder."""
    knobs = DecodeKnobs(beam_size=1, temperatures=(0.0, 0.2), log_prob_threshold=0.0)
    greedy = FasterWhisperEngine(bundled_ct2_dir(), "cpu", knobs, cpu_threads=1)
    model = greedy._loaded()
    encoded_batches: list[int] = []
    sampled: list[int] = []  # clips per decode at temperature > 0
    encode, generator = model.encode, model.model

    def counting_encode(features, *args, **kwargs):
        encoded_batches.append(len(features))
        return encode(features, *args, **kwargs)

    class CountingGenerator:
        def __getattr__(self, name: str) -> object:
            return getattr(generator, name)

        def generate(self, encoded, prompts, **kwargs):
            if kwargs.get("sampling_temperature", 0) > 0:
                sampled.append(len(prompts))
            return generator.generate(encoded, prompts, **kwargs)

    model.encode, model.model = counting_encode, CountingGenerator()  # type: ignore[method-assign]
    speech = decode_audio(LOOP_CLIP.read_bytes())
    tone = 0.01 * np.sin(np.arange(16_000, dtype=np.float32))  # quiet, but above the silence gate
    try:
        results = greedy.transcribe([speech, tone])
    finally:
        greedy.close()
    assert encoded_batches == [2]  # one pass for both clips, none for the re-decodes
    assert sampled and sampled[0] >= 1  # the speech clip was re-decoded at 0.2
    assert results[0].text


def test_defaults_per_device():
    assert default_batch_size("cpu") == 4 and default_batch_size("cuda") == 8
    assert default_batch_size("cpu", "openai-whisper") == 8  # not re-measured: unchanged
    assert default_workers("cuda") == 1
    assert default_workers("cpu") == (2 if len(os.sched_getaffinity(0)) >= 2 else 1)
    assert load_engine("faster-whisper", device="cpu", workers=3).workers == 3  # type: ignore[attr-defined]


class OverlapEngine:
    """A real engine that records how many of its calls run at once (the most seen)."""

    def __init__(self, inner: FasterWhisperEngine) -> None:
        self.inner = inner
        self.name, self.model_name, self.device, self.options = inner.name, inner.model_name, inner.device, inner.options
        self.workers = 2
        self.running = self.most = 0
        self.both_in = threading.Barrier(2, timeout=60)
        self._lock = threading.Lock()

    def transcribe(self, batch: list[np.ndarray], language: str | None = None, *options: object) -> list[Transcript]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            self.both_in.wait()  # fails (BrokenBarrierError) unless a second call arrives meanwhile
            return self.inner.transcribe(batch, language, *options)
        finally:
            with self._lock:
                self.running -= 1

    def close(self) -> None:
        pass


def test_batcher_workers_run_two_batches_at_once(engine: FasterWhisperEngine, demo_clips: list[DemoClip]):
    overlap = OverlapEngine(engine)

    async def scenario() -> list[Transcript]:
        batcher = Batcher(overlap, max_batch_size=2, max_wait_ms=50, workers=2)  # type: ignore[arg-type]
        batcher.start()
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(batcher.transcribe(c.audio) for c in demo_clips[:4])), 120
            )
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert overlap.most == 2
    assert [r.text for r in results] == [t.text for t in engine.transcribe([c.audio for c in demo_clips[:4]])]

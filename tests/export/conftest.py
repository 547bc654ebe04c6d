"""A small results root built by hand: real FLAC files, JSONL lines with real tokens, a manifest.

No flow run: the lines are what merge writes (`{id, transcription, token_array}`, optionally
`quality`), the tokens come from the real `simulated` tokeniser on the real audio, and the
manifest from `write_manifest`. Clips differ in rate, length and channels; one line's audio is
missing, as after a file was deleted, so every export must account for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tasks.manifest import write_manifest
from tasks.records import RunSummary
from tasks.settings import PipelineSettings
from tasks.tokenisers import get_tokeniser

# (id, seconds, sample rate, channels, transcription)
CLIPS = [
    ("p225/p225_001_mic2.flac", 1.30, 16_000, 1, "The birch canoe slid on the smooth planks."),
    ("p225/p225_002_mic2.flac", 0.72, 16_000, 1, "Glue the sheet to the dark blue background."),
    ("p225/p225_003_mic2.flac", 2.05, 22_050, 2, "It's easy to tell the depth of a well."),
    ("p226/p226_001_mic2.flac", 1.00, 48_000, 1, "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich."),
    ("p226/p226_002_mic2.flac", 0.50, 16_000, 1, ""),
    ("p227/p227.take.001_mic2.flac", 0.90, 16_000, 1, "Rice is often served in round bowls."),
]
MISSING = "p227/p227_404_mic2.flac"  # a line whose audio is gone


@dataclass(frozen=True)
class Results:
    root: Path
    audio_root: Path
    lines: dict[str, dict]  # id -> the JSONL line
    durations: dict[str, float]  # id -> seconds, for clips whose audio exists


def _signal(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(seed)
    mono = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.size)
    return np.stack([mono, mono[::-1]], axis=1) if channels == 2 else mono


def build_results(base: Path, *, with_quality: bool) -> Results:
    audio_root, root = base / "audio", base / "results"
    tokeniser = get_tokeniser("simulated", device="cpu", workload_size=0)
    lines: dict[str, dict] = {}
    durations: dict[str, float] = {}
    for seed, (file_id, seconds, rate, channels, text) in enumerate(CLIPS):
        signal = _signal(seconds, rate, channels, seed)
        path = audio_root / file_id
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, signal, rate, subtype="PCM_16")
        durations[file_id] = signal.shape[0] / rate
        mono16k = _signal(seconds, 16_000, 1, seed).astype(np.float32)
        lines[file_id] = {"id": file_id, "transcription": text, "token_array": tokeniser.tokenise([mono16k])[0]}
    lines[MISSING] = {"id": MISSING, "transcription": "Gone.", "token_array": [1, 2, 3]}
    if with_quality:
        for i, line in enumerate(lines.values()):
            line["quality"] = {
                "duration": durations.get(line["id"], 0.6), "language": "en",
                "avg_logprob": -0.1 * i, "no_speech_prob": 0.01, "compression_ratio": 1.2,
                "temperature": 0.0, "words_per_second": 2.5, "flags": ["too_fast"] if i == 2 else [],
                # Flat, as tasks.merge.quality_object writes it: transcript and audio fields side by side.
                "sample_rate": 16000, "channels": 1, "rms_dbfs": -20.5, "clipped_fraction": 0.0,
                "silence_fraction": 0.1, "snr_db": None if i == 1 else 30.0,
            }
    root.mkdir(parents=True)
    by_folder: dict[str, list[dict]] = {}
    for line in lines.values():
        by_folder.setdefault(line["id"].split("/")[0], []).append(line)
    for folder, folder_lines in by_folder.items():
        (root / f"{folder}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in folder_lines))
    # Not lines: an errors file and intermediates must never be exported.
    (root / "p225.errors.jsonl").write_text('{"id": "p225/p225_009_mic2.flac", "stage": "decode", "error": "x"}\n')
    (root / "tokens" / "p225").mkdir(parents=True)
    (root / "tokens" / "p225" / "p225_001_mic2.json").write_text("{}")
    settings = PipelineSettings(audio_root=str(audio_root), results_root=str(root), tokenizer="simulated",
                                with_quality=with_quality)
    summary = RunSummary(folders=3, files=len(lines), lines=len(lines), failed=0, audio_hours=0.001,
                         wall_seconds=1.0, files_per_second=7.0, results_root=str(root))
    health = {"status": "ok", "engine": "openai-whisper", "model": "tiny.en", "fingerprint": "abc123"}
    write_manifest(str(root), settings=settings, health=health, summary=summary, run_id="run-1",
                   tokenizer_settings=tokeniser.settings)
    return Results(root=root, audio_root=audio_root, lines=lines, durations=durations)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return build_results(tmp_path_factory.mktemp("plain"), with_quality=False)


@pytest.fixture(scope="module")
def quality_results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    return build_results(tmp_path_factory.mktemp("quality"), with_quality=True)

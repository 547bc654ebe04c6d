"""Engine registry: `load_engine` turns (engine name, model, device, decode knobs) into an Engine."""

from __future__ import annotations

import os
from typing import Literal

from whisper_service.decode_options import DecodeKnobs, DecodeOptions
from whisper_service.engines.base import Engine, ModelNotAvailableError, Segment, Transcript

EngineChoice = Literal["auto", "openai-whisper", "faster-whisper"]
EngineName = EngineChoice  # the settings' type: "auto" or a concrete engine
DeviceName = Literal["auto", "cpu", "cuda"]

__all__ = [
    "DecodeKnobs",
    "DecodeOptions",
    "DeviceName",
    "Engine",
    "EngineChoice",
    "EngineName",
    "ModelNotAvailableError",
    "Segment",
    "Transcript",
    "default_batch_size",
    "default_workers",
    "load_engine",
    "pick_engine",
]


def cuda_available() -> bool:
    """True when torch sees a CUDA device (the device both engines would use under "auto")."""
    import torch

    return torch.cuda.is_available()


def pick_engine(engine: EngineChoice, device: DeviceName = "auto") -> Literal["openai-whisper", "faster-whisper"]:
    """Resolve `--engine auto` by measurement on the hardware found.

    CPU: faster-whisper int8. With each engine's default preset (faster-whisper beam 5,
    openai-whisper greedy, both with the fallback ladder) it had the lower WER on the demo corpus
    (0.151 vs 0.164) and on the harder espeak-ng set (bench/quality.py,
    bench/results/quality-cpu.json) in about half the time; issue 12 measured the same on real
    speech. CUDA: openai-whisper fp16, the product's engine of record, until a GPU run of
    bench/quality.py says otherwise.
    """
    if engine != "auto":
        return engine
    on_gpu = device == "cuda" or (device == "auto" and cuda_available())
    return "openai-whisper" if on_gpu else "faster-whisper"


def default_batch_size(device: str, engine: str = "faster-whisper") -> int:
    """Most clips per engine call when the settings name none, by measurement
    (docs/PERFORMANCE.md): faster-whisper on CPU 4 (a 30 s encoder window costs least per clip at
    batch 2-4 and more again at 16, and batch 4 still fills a beam-5 decode); otherwise 8, as
    before (larger batches keep paying on CUDA; openai-whisper on CPU was not re-measured)."""
    return 4 if device == "cpu" and engine == "faster-whisper" else 8


def default_workers(device: str) -> int:
    """Concurrent engine calls for faster-whisper when the settings name none: 2 on a CPU with
    2+ cores (each call on half the cores; docs/PERFORMANCE.md), else 1."""
    return 2 if device == "cpu" and len(os.sched_getaffinity(0)) >= 2 else 1


def load_engine(
    engine: EngineChoice,
    model: str = "tiny.en",
    device: DeviceName = "auto",
    knobs: DecodeKnobs | None = None,
    *,
    workers: int | None = None,
) -> Engine:
    """Load `model` (a name available offline, or a local path) into the named engine.

    openai-whisper gets an openai `.pt` (a CTranslate2 dir is converted once and cached);
    faster-whisper gets a CTranslate2 directory. Engines are imported lazily so a process
    only pays for the one it uses. Nothing is ever downloaded. `workers` (faster-whisper only):
    engine calls that may run at once; None: `default_workers` for the device it lands on. The engine's `options` (what
    `/healthz` reports) combine `knobs` with the weights' content hash.

    Raises:
        ModelNotAvailableError: the model cannot be found offline; the message says what can.
        ValueError: unknown engine, or a device or compute type that is not available.
    """
    from whisper_service.engines.models import forbid_downloads, resolve_model, weights_sha256

    if engine not in ("auto", "openai-whisper", "faster-whisper"):
        raise ValueError(f"unknown engine {engine!r}: use 'auto', 'openai-whisper' or 'faster-whisper'")
    forbid_downloads()
    resolved = resolve_model(model)
    if engine == "auto" and resolved.format == "openai":
        engine = "openai-whisper"  # an openai .pt only runs there; auto never fails on it
    engine = pick_engine(engine, device)
    if engine == "openai-whisper":
        from whisper_service.engines.convert import (
            CONVERTER_VERSION,
            ConversionError,
            converted_checkpoint,
        )
        from whisper_service.engines.openai_whisper import OpenAIWhisperEngine

        checkpoint, converter = resolved.path, None
        if resolved.format == "ctranslate2":
            try:
                checkpoint = converted_checkpoint(resolved.path)
            except ConversionError as e:
                raise ModelNotAvailableError(f"cannot use {resolved.path}: {e}") from e
            converter = CONVERTER_VERSION
        return OpenAIWhisperEngine(
            checkpoint, resolved.name, device, knobs,
            weights_sha256=weights_sha256(resolved.path), converter_version=converter,
        )
    if resolved.format != "ctranslate2":
        raise ModelNotAvailableError(
            f"faster-whisper needs a CTranslate2 model directory, but {model!r} resolved to "
            f"the openai-whisper checkpoint {resolved.path}; use engine 'openai-whisper' "
            f"or pass a CTranslate2 directory (with model.bin)"
        )
    from whisper_service.engines.faster_whisper import FasterWhisperEngine, resolve_device

    return FasterWhisperEngine(
        resolved.path, device, knobs, model_name=resolved.name,
        workers=workers or default_workers(resolve_device(device)),
        weights_sha256=weights_sha256(resolved.path),
    )

"""Engine registry: `load_engine` turns (engine name, model, device) into a loaded Engine."""

from __future__ import annotations

from typing import Literal

from whisper_service.engines.base import Engine, ModelNotAvailableError, Transcript

EngineName = Literal["openai-whisper", "faster-whisper"]
DeviceName = Literal["auto", "cpu", "cuda"]

__all__ = ["Engine", "EngineName", "DeviceName", "ModelNotAvailableError", "Transcript", "load_engine"]


def load_engine(engine: EngineName, model: str = "tiny.en", device: DeviceName = "auto") -> Engine:
    """Load `model` (a name available offline, or a local path) into the named engine.

    openai-whisper gets an openai `.pt` (a CTranslate2 dir is converted once and cached);
    faster-whisper gets a CTranslate2 directory. Engines are imported lazily so a process
    only pays for the one it uses. Nothing is ever downloaded.

    Raises:
        ModelNotAvailableError: the model cannot be found offline; the message says what can.
        ValueError: unknown engine, or a device that is not available.
    """
    from whisper_service.engines.models import forbid_downloads, resolve_model

    if engine not in ("openai-whisper", "faster-whisper"):
        raise ValueError(f"unknown engine {engine!r}: use 'openai-whisper' or 'faster-whisper'")
    forbid_downloads()
    resolved = resolve_model(model)
    if engine == "openai-whisper":
        from whisper_service.engines.convert import ConversionError, converted_checkpoint
        from whisper_service.engines.openai_whisper import OpenAIWhisperEngine

        checkpoint = resolved.path
        if resolved.format == "ctranslate2":
            try:
                checkpoint = converted_checkpoint(resolved.path)
            except ConversionError as e:
                raise ModelNotAvailableError(f"cannot use {resolved.path}: {e}") from e
        return OpenAIWhisperEngine(checkpoint, resolved.name, device)
    if resolved.format != "ctranslate2":
        raise ModelNotAvailableError(
            f"faster-whisper needs a CTranslate2 model directory, but {model!r} resolved to "
            f"the openai-whisper checkpoint {resolved.path}; use engine 'openai-whisper' "
            f"or pass a CTranslate2 directory (with model.bin)"
        )
    from whisper_service.engines.faster_whisper import FasterWhisperEngine

    return FasterWhisperEngine(resolved.path, device, model_name=resolved.name)

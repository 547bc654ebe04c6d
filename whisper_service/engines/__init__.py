"""Engine registry: `load_engine` turns (engine name, model, device) into a loaded Engine."""

from __future__ import annotations

from typing import Literal

from whisper_service.engines.base import Engine, ModelNotAvailableError, Transcript

EngineName = Literal["openai-whisper", "faster-whisper"]
DeviceName = Literal["auto", "cpu", "cuda"]

__all__ = ["Engine", "EngineName", "DeviceName", "ModelNotAvailableError", "Transcript", "load_engine"]


def load_engine(engine: EngineName, model: str = "tiny.en", device: DeviceName = "auto") -> Engine:
    """Load `model` (a name available offline, or a local path) into the named engine.

    Raises:
        ModelNotAvailableError: the model cannot be found offline; the message says what can.
    """
    raise NotImplementedError  # filled in by the engines work

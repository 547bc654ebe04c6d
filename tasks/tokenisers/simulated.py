"""The prototype's stand-in tokeniser, kept for load tests: a dummy tensor workload, a delay, and
deterministic pseudo-tokens derived from the audio.

It exercises the same scheduling as a real model (device placement, one call per batch, GPU
resource in Dask) without any model cost, and its tokens still change whenever the audio does,
so resumability and provenance checks behave as with `rpq`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import torch

from tasks.tokenisers.base import as_float32_clips, resolve_device
from tasks.tokenisers.settings import (
    SIMULATED_FRAME_SAMPLES,
    SIMULATED_SAMPLE_RATE,
    SIMULATED_VOCAB_SIZE,
    simulated_settings,
)
from tasks.tokenisers.specs import DescribedBySettings

SAMPLE_RATE = SIMULATED_SAMPLE_RATE
FRAME_SAMPLES = SIMULATED_FRAME_SAMPLES  # 40 ms at 16 kHz: 25 tokens per second, like rpq
VOCAB_SIZE = SIMULATED_VOCAB_SIZE


class SimulatedTokeniser(DescribedBySettings):
    """Pseudo-tokens: blake2b of each 40 ms frame's float32 bytes, mod 8192.

    Args:
        device: "auto" (CUDA if torch sees it), "cpu", or "cuda[:N]"; where the workload runs.
        delay_s: seconds slept per `tokenise` call (per batch), after the workload.
        workload_size: side of the square matrix multiplied on the device per call; 0 for none.

    Raises:
        ValueError: a negative delay or workload size, or an unusable device.
    """

    name = "simulated"
    sample_rate = SAMPLE_RATE

    def __init__(self, *, device: str = "auto", delay_s: float = 0.0, workload_size: int = 256) -> None:
        self._settings = simulated_settings(delay_s=delay_s, workload_size=workload_size)
        self.device = resolve_device(device)
        self.delay_s = float(delay_s)
        self.workload_size = int(workload_size)

    @property
    def settings(self) -> dict[str, Any]:
        """What determines the tokens (see `simulated_settings`: not the delay or workload)."""
        return dict(self._settings)

    def tokenise(self, batch: list[np.ndarray]) -> list[list[int]]:
        """One list per clip of `len(clip) // 640` ints in [0, 8192); clips under 40 ms give [].

        Raises:
            ValueError: a clip that is not 1-D finite float audio (its index is named).
        """
        clips = as_float32_clips(batch)
        self._workload()
        if self.delay_s:
            time.sleep(self.delay_s)
        return [_pseudo_tokens(clip) for clip in clips]

    def _workload(self) -> None:
        """A matmul on the device, synchronised by `.item()` so the time is really spent."""
        if not self.workload_size:
            return
        with torch.inference_mode():
            a = torch.ones((self.workload_size, self.workload_size), device=self.device)
            (a @ a).sum().item()


def _pseudo_tokens(clip: np.ndarray) -> list[int]:
    """blake2b (not Python's salted `hash`) so tokens agree across processes and machines."""
    n_frames = clip.shape[0] // FRAME_SAMPLES
    frames = clip[: n_frames * FRAME_SAMPLES].reshape(n_frames, FRAME_SAMPLES)
    return [
        int.from_bytes(hashlib.blake2b(frame.tobytes(), digest_size=8).digest(), "little") % VOCAB_SIZE
        for frame in frames
    ]

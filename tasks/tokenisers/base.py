"""The one interface every audio tokeniser implements, plus the input checks they share.

A tokeniser is built once per worker process and then called with batches (the pipeline caches
instances per process), so construction must be cheap-ish and free of side effects beyond
loading what it needs. Batched and single calls share one signature and give the same tokens.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from tasks.tokenisers.specs import TokenSpec


@runtime_checkable
class Tokeniser(Protocol):
    """Maps a batch of mono float waveforms to one token list per input, in order.

    `tokenise` is deterministic for the same input, `settings` and device. `settings` holds every
    parameter that determines the tokens and nothing else (no delays, no paths to equal weights),
    so the pipeline can store it as provenance and re-tokenise exactly when it changes.
    """

    name: str  # "rpq" | "simulated" | "encodec"
    sample_rate: int  # rate the input arrays must already be at, e.g. 16000
    device: str  # "cpu" | "cuda" | "cuda:1"

    @property
    def settings(self) -> dict[str, Any]: ...

    def tokenise(self, batch: list[np.ndarray]) -> list[list[int]]: ...

    def describe(self) -> TokenSpec:
        """Rate, vocabulary and layout of the tokens: `specs.describe_tokens(self.settings)`."""
        ...


def resolve_device(device: str) -> str:
    """Turn "auto" into "cuda" when torch sees a GPU, else "cpu"; check explicit names.

    Raises:
        ValueError: the name is not a torch device, or CUDA was asked for but is not available.
    """
    import torch  # here, not at the top: the flow process imports this package but never tokenises

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from e
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch.cuda.is_available() is False; use 'auto' or 'cpu'")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'")
    return str(parsed)


def as_float32_clips(batch: list[np.ndarray]) -> list[np.ndarray]:
    """Check every clip is 1-D finite float audio and return float32 copies that torch may own.

    A copy, because `torch.from_numpy` on a read-only array (a memory map, a decoded buffer) warns
    and would share memory the caller still holds.

    Raises:
        ValueError: naming the first bad clip's index and what is wrong with it.
    """
    clips: list[np.ndarray] = []
    for i, clip in enumerate(batch):
        array = np.asarray(clip)
        if array.ndim != 1:
            raise ValueError(f"clip {i}: expected 1-D mono samples, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"clip {i}: expected float samples in [-1, 1], got dtype {array.dtype}")
        copy = np.array(array, dtype=np.float32, copy=True)
        if not np.isfinite(copy).all():
            raise ValueError(f"clip {i}: contains NaN or infinite samples")
        clips.append(copy)
    return clips

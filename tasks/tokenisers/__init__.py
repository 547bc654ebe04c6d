"""Tokeniser registry: `get_tokeniser` turns (name, device, options) into a ready Tokeniser.

Modules are imported on first use, so choosing `simulated` never imports openai-whisper and a
missing `encodec` package only matters to whoever asks for `encodec`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

from tasks.tokenisers.base import Tokeniser
from tasks.tokenisers.specs import TokenSpec, describe_tokens

TokeniserName = Literal["rpq", "simulated", "encodec"]
DEFAULT_TOKENISER: TokeniserName = "rpq"
# name -> (module, class); the first is the default.
_REGISTRY: dict[str, tuple[str, str]] = {
    "rpq": ("tasks.tokenisers.rpq", "RpqTokeniser"),
    "simulated": ("tasks.tokenisers.simulated", "SimulatedTokeniser"),
    "encodec": ("tasks.tokenisers.encodec", "EncodecTokeniser"),
}
TOKENISER_NAMES: tuple[str, ...] = tuple(_REGISTRY)

__all__ = [
    "DEFAULT_TOKENISER", "TOKENISER_NAMES", "TokenSpec", "Tokeniser", "TokeniserName", "describe_tokens", "get_tokeniser",
]


def get_tokeniser(name: str = DEFAULT_TOKENISER, *, device: str = "auto", **options: Any) -> Tokeniser:
    """Build the named tokeniser. Build once per worker process and reuse it for every batch.

    Args:
        name: one of `TOKENISER_NAMES`.
        device: "auto" (CUDA when torch sees it, else CPU), "cpu", or "cuda[:N]".
        **options: the tokeniser's own keyword options, e.g. `seed` for rpq, `delay_s` for
            simulated, `weights_path` and `bandwidth` for encodec.

    Raises:
        ValueError: an unknown name or option (the message lists the valid ones), or an option
            value the tokeniser refuses.
        ImportError: the tokeniser's optional package is not installed (encodec).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown tokeniser {name!r}; available: {', '.join(TOKENISER_NAMES)}")
    module_name, class_name = _REGISTRY[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    accepted = [p for p in inspect.signature(cls).parameters if p != "device"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for tokeniser {name!r}; accepted: {', '.join(accepted)}")
    return cls(device=device, **options)

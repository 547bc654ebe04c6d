"""Tokeniser registry: `get_tokeniser` turns (name, device, options) into a ready Tokeniser.

Modules are imported on first use, so choosing `simulated` never imports openai-whisper and a
missing `encodec` package only matters to whoever asks for `encodec`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

from tasks.tokenisers.base import Tokeniser
from tasks.tokenisers.settings import SETTINGS_WITHOUT_BUILDING
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
    "tokeniser_settings",
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
    cls = _tokeniser_class(name)
    _check_options(name, cls, options)
    return cls(device=device, **options)


def tokeniser_settings(name: str = DEFAULT_TOKENISER, **options: Any) -> dict[str, Any]:
    """`get_tokeniser(name, **options).settings`, validated alike, without building the tokeniser
    where its settings follow from its options (rpq, simulated: no torch imported).

    Raises: as `get_tokeniser`.
    """
    if name not in SETTINGS_WITHOUT_BUILDING:
        return get_tokeniser(name, device="cpu", **options).settings
    settings_of = SETTINGS_WITHOUT_BUILDING[name]
    _check_options(name, settings_of, options)
    return settings_of(**options)


def _tokeniser_class(name: str) -> type[Tokeniser]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown tokeniser {name!r}; available: {', '.join(TOKENISER_NAMES)}")
    module_name, class_name = _REGISTRY[name]
    return getattr(importlib.import_module(module_name), class_name)


def _check_options(name: str, accepts: Any, options: dict[str, Any]) -> None:
    accepted = [p for p in inspect.signature(accepts).parameters if p != "device"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for tokeniser {name!r}; accepted: {', '.join(accepted)}")

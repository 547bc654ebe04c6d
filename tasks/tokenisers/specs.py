"""What a `token_array` means, derived from a tokeniser's provenance settings alone.

A JSONL file separated from its run is useless to a speech-LM unless it says how many tokens
make a second, how large the vocabulary is and how codebooks are laid out. All of that follows
from the `settings` dict each tokeniser stores with its tokens (`Tokens.tokenizer_settings`), so
it is computed here from that dict, without torch or weights: the flow process can describe the
tokens it never made, and a stored intermediate describes itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Layout = Literal["flat", "interleaved frame-major"]

# EnCodec 24 kHz: a 320-sample encoder hop (75 frames/s), 1024 codes per residual codebook.
ENCODEC_HOP_SAMPLES = 320
ENCODEC_CODEBOOK_SIZE = 1024


class TokenSpec(BaseModel):
    """The token stream one tokeniser configuration produces."""

    # extra="ignore": a manifest from a newer version, with more fields here, still reads.
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str  # "rpq" | "simulated" | "encodec"
    version: int  # the tokeniser's algorithm version (bumped when tokens change)
    settings: dict[str, Any]  # the full provenance settings, as stored with every Tokens intermediate
    sample_rate: int  # Hz the audio is resampled to before tokenising
    frame_samples: int  # samples (at sample_rate) per frame
    frames_per_second: float
    n_codebooks: int  # tokens per frame
    tokens_per_second: float  # frames_per_second * n_codebooks
    codebook_size: int  # every value lies in [0, codebook_size), in each codebook
    layout: Layout
    layout_description: str
    partial_frame: Literal["dropped", "padded"]  # what happens to a trailing partial frame
    value_dtype: str  # smallest unsigned numpy dtype holding every value, e.g. "uint16"

    def tokens_for_samples(self, n_samples: int) -> int:
        """How many tokens a clip of `n_samples` samples (at `sample_rate`) yields."""
        if self.partial_frame == "dropped":
            frames = n_samples // self.frame_samples
        else:
            frames = -(-n_samples // self.frame_samples)
        return frames * self.n_codebooks


class DescribedBySettings:
    """`describe()` for a tokeniser: its TokenSpec follows from its `settings` alone."""

    settings: dict[str, Any]  # a property on each tokeniser

    def describe(self) -> TokenSpec:
        """Rate, vocabulary and codebook layout of these tokens (written to results/manifest.json)."""
        return describe_tokens(self.settings)


def describe_tokens(settings: dict[str, Any]) -> TokenSpec:
    """The `TokenSpec` of the tokeniser whose provenance settings are `settings`.

    Raises:
        ValueError: a tokeniser name this module does not know, or settings missing a key it needs.
    """
    name = settings.get("name")
    try:
        if name == "rpq":
            return _rpq(settings)
        if name == "simulated":
            return _simulated(settings)
        if name == "encodec":
            return _encodec(settings)
    except KeyError as e:
        raise ValueError(f"tokeniser settings for {name!r} lack {e.args[0]!r}: {settings}") from e
    raise ValueError(f"cannot describe tokens of tokeniser {name!r}: unknown name")


def _flat(settings: dict[str, Any], frame_samples: int, codebook_size: int, what: str) -> TokenSpec:
    rate = int(settings["sample_rate"])
    return TokenSpec(
        name=settings["name"], version=int(settings["version"]), settings=settings, sample_rate=rate,
        frame_samples=frame_samples, frames_per_second=rate / frame_samples, n_codebooks=1,
        tokens_per_second=rate / frame_samples, codebook_size=codebook_size, layout="flat",
        layout_description=f"one token per {1000 * frame_samples / rate:g} ms frame, in time order ({what})",
        partial_frame="dropped", value_dtype=_dtype_for(codebook_size),
    )


def _rpq(settings: dict[str, Any]) -> TokenSpec:
    frame = int(settings["hop_samples"]) * int(settings["stack"])
    return _flat(settings, frame, int(settings["codebook_size"]), "BEST-RQ codeword index")


def _simulated(settings: dict[str, Any]) -> TokenSpec:
    return _flat(settings, int(settings["frame_samples"]), int(settings["vocab_size"]), "hash of the frame")


def _encodec(settings: dict[str, Any]) -> TokenSpec:
    rate, n_q = int(settings["sample_rate"]), int(settings["n_q"])
    fps = rate / ENCODEC_HOP_SAMPLES
    return TokenSpec(
        name="encodec", version=int(settings["version"]), settings=settings, sample_rate=rate,
        frame_samples=ENCODEC_HOP_SAMPLES, frames_per_second=fps, n_codebooks=n_q, tokens_per_second=fps * n_q,
        codebook_size=ENCODEC_CODEBOOK_SIZE, layout="interleaved frame-major",
        layout_description=(
            f"for each {fps:g} Hz frame, the codes of its {n_q} residual codebooks in order "
            f"(q0..q{n_q - 1}): token_array[f * {n_q} + q]; values are per-codebook indices, not offset"
        ),
        partial_frame="padded", value_dtype=_dtype_for(ENCODEC_CODEBOOK_SIZE),
    )


def _dtype_for(codebook_size: int) -> str:
    for dtype, limit in (("uint8", 1 << 8), ("uint16", 1 << 16), ("uint32", 1 << 32)):
        if codebook_size <= limit:
            return dtype
    return "uint64"

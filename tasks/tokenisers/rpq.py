"""BEST-RQ random-projection quantiser: weights-free, reproducible speech tokens at 25 per second.

Chiu et al., 2022, "Self-supervised learning with random-projection quantizer for speech
recognition" (arXiv:2202.01855), section 3.1: normalised log-mel frames, stacked to 40 ms, are
projected by a fixed random (Xavier-initialised) matrix and labelled with the index of the
nearest of a fixed set of random unit codewords. Nothing is trained, so the only "weights" are the
seed: every machine that runs this with the same settings produces the same vocabulary.

Pipeline per clip (16 kHz input):
1. 80-bin log-mel from openai-whisper (25 ms window, 10 ms hop: `n_samples // 160` frames).
2. Per-utterance mean/variance normalisation per mel bin (the paper notes normalisation is
   critical: without it projections collapse onto a few codewords). Zero-variance bins, as in
   digital silence, are centred but not scaled, so silence yields valid tokens, not NaN (an
   all-constant clip projects to the zero vector: an exact tie, which argmax gives to token 0).
3. 4 consecutive frames stacked frame-major into a 320-dim vector (40 ms); an incomplete last
   group is dropped, so a clip gives `n_samples // 640` tokens and one shorter than 40 ms gives
   an empty list.
4. Projection to 16 dims, L2-normalisation, and the argmax of cosine similarity against 8192
   L2-normalised standard-normal codewords.

CPU vs CUDA: the log-mel (cuFFT vs pocketFFT), the mel-filter product and both matmuls sum in a
different order on the GPU, so features differ in the last float32 bits. A frame whose two best
codewords are that close to a tie can take the other index; this is rare, so tokens agree on
nearly every frame, not all: compare devices with a tolerance (>= 99% of tokens equal), and
compare bit-for-bit only on one device. The same holds between CPUs whose BLAS takes another
code path (AVX2 vs AVX-512): bit-identical tokens need the same hardware and torch build.
Enabling TF32 matmuls process-wide (`torch.set_float32_matmul_precision("high")`) would widen
the gap; we leave that process-wide switch alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import whisper.audio

from tasks.tokenisers.base import as_float32_clips, resolve_device
from tasks.tokenisers.settings import (
    RPQ_ALGORITHM_VERSION,
    RPQ_HOP_SAMPLES,
    RPQ_N_MELS,
    RPQ_SAMPLE_RATE,
    RPQ_STACK,
    rpq_settings,
)
from tasks.tokenisers.specs import DescribedBySettings

SAMPLE_RATE = RPQ_SAMPLE_RATE
N_MELS = RPQ_N_MELS
HOP_SAMPLES = RPQ_HOP_SAMPLES  # whisper.audio.HOP_LENGTH: 10 ms at 16 kHz
STACK = RPQ_STACK  # frames per token: 40 ms, 25 tokens per second
MIN_SAMPLES = HOP_SAMPLES * STACK  # 640 samples = 40 ms, the shortest clip that yields a token
NORM_EPS = 1e-5  # std floor: constant bins (silence) stay 0 after centring instead of 0/0 = NaN
# Every matmul sees exactly this many rows (zero-padded). BLAS picks its kernel, and so its
# summation order, by shape: a 1-row product (gemv) differs from the same row inside a 1000-row
# one in the last bits, which can flip a near-tie. One fixed shape makes a row's result
# independent of its batch, hence batched == one-by-one exactly. Also caps the similarity
# matrix at 32 MiB for 8192 codewords.
ROWS_PER_MATMUL = 1024
ALGORITHM_VERSION = RPQ_ALGORITHM_VERSION  # bumped in tasks/tokenisers/settings.py


class RpqTokeniser(DescribedBySettings):
    """BEST-RQ tokens from 16 kHz mono audio; CUDA when available, float32 on CPU otherwise.

    Args:
        device: "auto" (CUDA if torch sees it), "cpu", or "cuda[:N]".
        seed: seeds the CPU generator that draws the projection, then the codebook.
        codebook_size: number of codewords, i.e. the vocabulary size (tokens lie in [0, size)).
        codebook_dim: projection width.

    Raises:
        ValueError: a non-positive size or dimension, a negative seed, or an unusable device.
    """

    name = "rpq"
    sample_rate = SAMPLE_RATE

    def __init__(
        self, *, device: str = "auto", seed: int = 0, codebook_size: int = 8192, codebook_dim: int = 16
    ) -> None:
        self._settings = rpq_settings(seed=seed, codebook_size=codebook_size, codebook_dim=codebook_dim)
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim)
        projection, codebook = random_quantiser(self.seed, N_MELS * STACK, self.codebook_dim, self.codebook_size)
        # Drawn on CPU so the values never depend on the device, then moved once.
        self._projection = projection.to(self.device)
        self._codebook_t = codebook.T.contiguous().to(self.device)  # (dim, size): rows @ it = cosines

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that determines the tokens (JSON-native, for provenance)."""
        return dict(self._settings)

    def tokenise(self, batch: list[np.ndarray]) -> list[list[int]]:
        """One token list per clip, in order: `len(clip) // 640` ints in [0, codebook_size).

        Each clip's features are computed alone (per-utterance statistics), so a clip gets the
        same tokens whatever else is in its batch; only the quantisation is batched.

        Raises:
            ValueError: a clip that is not 1-D finite float audio (its index is named).
        """
        clips = as_float32_clips(batch)
        if not clips:
            return []
        with torch.inference_mode():
            stacked = [self._stacked_frames(clip) for clip in clips]
            counts = [int(s.shape[0]) for s in stacked]
            if sum(counts) == 0:
                return [[] for _ in clips]
            tokens = self._nearest_codewords(torch.cat(stacked)).cpu()
        return [part.tolist() for part in torch.split(tokens, counts)]

    def _stacked_frames(self, clip: np.ndarray) -> torch.Tensor:
        """(n_samples // 640, 320) normalised, stacked log-mel frames of one clip."""
        if clip.shape[0] < MIN_SAMPLES:
            return torch.empty((0, N_MELS * STACK), dtype=torch.float32, device=self.device)
        mel = whisper.audio.log_mel_spectrogram(torch.from_numpy(clip), n_mels=N_MELS, device=self.device)
        mean = mel.mean(dim=1, keepdim=True)
        std = mel.std(dim=1, keepdim=True, correction=0).clamp_min(NORM_EPS)
        normalised = (mel - mean) / std  # (80, frames)
        groups = normalised.shape[1] // STACK
        # (80, frames) -> (frames, 80) -> (groups, 4 * 80): frame t's 80 bins, then frame t+1's, ...
        return normalised[:, : groups * STACK].T.reshape(groups, N_MELS * STACK)

    def _nearest_codewords(self, frames: torch.Tensor) -> torch.Tensor:
        """Index of the max-cosine codeword for each row; argmax keeps the first of exact ties."""
        n_rows = frames.shape[0]
        padded = F.pad(frames, (0, 0, 0, -n_rows % ROWS_PER_MATMUL))  # see ROWS_PER_MATMUL
        out = []
        for rows in torch.split(padded, ROWS_PER_MATMUL):
            projected = F.normalize(rows @ self._projection, dim=1)
            out.append(torch.argmax(projected @ self._codebook_t, dim=1))
        return torch.cat(out)[:n_rows]


def random_quantiser(seed: int, input_dim: int, dim: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed Xavier-normal projection (input_dim, dim) and unit codebook (size, dim) for `seed`.

    Drawn from one CPU `torch.Generator` in that order, with plain `randn` scaled by hand rather
    than `nn.init.xavier_normal_`, so the values depend only on torch's CPU normal sampler.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    xavier_std = math.sqrt(2.0 / (input_dim + dim))
    projection = torch.randn((input_dim, dim), generator=generator, dtype=torch.float32) * xavier_std
    codebook = F.normalize(torch.randn((size, dim), generator=generator, dtype=torch.float32), dim=1)
    return projection, codebook

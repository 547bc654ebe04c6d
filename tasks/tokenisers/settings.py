"""Each tokeniser's provenance settings from its options, validated, without building it.

The flow process needs a tokeniser's settings (to plan reuse, to refuse bad options before any
cluster starts) but never its tokens. Building `rpq` or `simulated` there imported torch and
openai-whisper: ~5 s of CPU on the path of every run's start, a rerun with nothing to do
included. These functions are what the tokenisers themselves validate and store, so the two can
never disagree; `encodec` has no such function (its settings hash a weights file and ask the model
for its codebook count), so it is still built.
"""

from __future__ import annotations

from typing import Any

# rpq (tasks/tokenisers/rpq.py): BEST-RQ on whisper log-mel.
RPQ_SAMPLE_RATE = 16_000
RPQ_N_MELS = 80
RPQ_HOP_SAMPLES = 160  # whisper.audio.HOP_LENGTH: 10 ms at 16 kHz
RPQ_STACK = 4  # frames per token: 40 ms, 25 tokens per second
# Bump when the algorithm changes in a way the parameters below do not show, so stored tokens
# made by the old code are recognised as stale.
RPQ_ALGORITHM_VERSION = 1

# simulated (tasks/tokenisers/simulated.py): blake2b of 40 ms frames.
SIMULATED_SAMPLE_RATE = 16_000
SIMULATED_FRAME_SAMPLES = 640
SIMULATED_VOCAB_SIZE = 8192


def rpq_settings(*, seed: int = 0, codebook_size: int = 8192, codebook_dim: int = 16) -> dict[str, Any]:
    """Everything that determines rpq's tokens (JSON-native). Raises ValueError on a bad value."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if codebook_dim < 1:
        raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
    return {
        "name": "rpq",
        "version": RPQ_ALGORITHM_VERSION,
        "sample_rate": RPQ_SAMPLE_RATE,
        "features": "whisper-log-mel",
        "n_mels": RPQ_N_MELS,
        "hop_samples": RPQ_HOP_SAMPLES,
        "stack": RPQ_STACK,
        "normalisation": "per-utterance-mean-var",
        "seed": int(seed),
        "input_dim": RPQ_N_MELS * RPQ_STACK,
        "codebook_dim": int(codebook_dim),
        "codebook_size": int(codebook_size),
    }


def simulated_settings(*, delay_s: float = 0.0, workload_size: int = 256) -> dict[str, Any]:
    """What determines the simulated tokens. Not `delay_s` or `workload_size`: they change only
    timing, and putting them here would make the pipeline re-tokenise for nothing.

    Raises:
        ValueError: a negative delay or workload size.
    """
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, got {delay_s}")
    if workload_size < 0:
        raise ValueError(f"workload_size must be >= 0, got {workload_size}")
    return {
        "name": "simulated",
        "version": 1,
        "sample_rate": SIMULATED_SAMPLE_RATE,
        "frame_samples": SIMULATED_FRAME_SAMPLES,
        "hash": "blake2b-64",
        "vocab_size": SIMULATED_VOCAB_SIZE,
    }


SETTINGS_WITHOUT_BUILDING = {"rpq": rpq_settings, "simulated": simulated_settings}

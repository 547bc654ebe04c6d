"""Silero VAD (v6, ONNX) run over a stream of 16 kHz blocks, offline, on CPU.

The model ships in faster-whisper's wheel (`faster_whisper/assets/silero_vad_v6.onnx`), so no hub
download is needed. faster-whisper's `SileroVADModel.__call__` takes the whole file in one array;
it runs the windows of 512 samples as a sequence, carrying the LSTM state (h, c) from one batch
of windows to the next and prepending each window with the last 64 samples of the one before.
`StreamingVad` does exactly that across blocks, so its probabilities equal faster-whisper's on the
whole file (tested) while holding one block at a time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterable

import numpy as np

WINDOW = 512  # samples per probability at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees before each window
RATE = 16_000
_BATCH_WINDOWS = 1024  # windows per session.run (~33 s of audio)


def model_path() -> str:
    """faster-whisper's copy of the model, found without importing faster-whisper (and with it
    ctranslate2 and av: ~0.4 s the flow process only needs for this path and hash)."""
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("faster-whisper is not installed: its wheel ships the Silero VAD model")
    return os.path.join(spec.submodule_search_locations[0], "assets", "silero_vad_v6.onnx")


@functools.lru_cache(maxsize=1)
def model_sha256() -> str:
    """Content hash of the VAD model: part of the segmentation fingerprint."""
    digest = hashlib.sha256()
    with open(model_path(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _session():
    """One ONNX session per process, single-threaded like faster-whisper's (the pipeline's
    parallelism is across files and tasks, not inside one VAD)."""
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(model_path(), providers=["CPUExecutionProvider"], sess_options=opts)


class StreamingVad:
    """Speech probability per 32 ms window of a 16 kHz stream fed in blocks of any length."""

    def __init__(self) -> None:
        self._session = _session()
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.empty(0, np.float32)  # samples short of a whole window
        self.samples = 0  # fed so far

    def feed(self, block: np.ndarray) -> np.ndarray:
        """Probabilities of the windows this block completes (possibly none)."""
        self.samples += len(block)
        audio = np.concatenate([self._pending, block.astype(np.float32, copy=False)])
        whole = len(audio) - len(audio) % WINDOW
        self._pending = audio[whole:].copy()
        return self._run(audio[:whole])

    def finish(self) -> np.ndarray:
        """The last, zero-padded window (if samples are pending)."""
        if not len(self._pending):
            return np.empty(0, np.float32)
        last = np.zeros(WINDOW, np.float32)
        last[: len(self._pending)] = self._pending
        self._pending = np.empty(0, np.float32)
        return self._run(last)

    def _run(self, audio: np.ndarray) -> np.ndarray:
        if not len(audio):
            return np.empty(0, np.float32)
        windows = audio.reshape(-1, WINDOW)
        contexts = np.concatenate([self._context[None, :], windows[:-1, -CONTEXT:]])
        self._context = windows[-1, -CONTEXT:].copy()
        batch = np.concatenate([contexts, windows], axis=1)
        out = []
        for i in range(0, len(batch), _BATCH_WINDOWS):
            probs, self._h, self._c = self._session.run(
                None, {"input": batch[i : i + _BATCH_WINDOWS], "h": self._h, "c": self._c}
            )
            out.append(np.asarray(probs, np.float32).reshape(-1))
        return np.concatenate(out)


def speech_probabilities(blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    """Probabilities of every window of the stream, and how many samples it had.

    The probabilities are 1/512 of the audio's size (450 KB for 2 h): the one thing kept whole.
    """
    vad = StreamingVad()
    parts = [vad.feed(block) for block in blocks]
    parts.append(vad.finish())
    return np.concatenate(parts) if parts else np.empty(0, np.float32), vad.samples

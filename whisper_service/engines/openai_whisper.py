"""The default engine: openai-whisper, batched greedy decoding of up to 30 s clips.

Throughput comes from one encoder/decoder pass over the whole batch (`whisper.decode` on a
stacked mel tensor). Greedy only: batched beam search with `decode()` crashes in openai-whisper
20250625. Clips longer than one 30 s window go through `model.transcribe`, which slides the
window over the whole clip instead of silently keeping only the first 30 s.
"""

from __future__ import annotations

import gc
import os
import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.decoding import DecodingOptions, DecodingResult
from whisper.model import ModelDimensions, Whisper

from whisper_service.audio import SAMPLE_RATE
from whisper_service.engines.base import (
    LOGPROB_THRESHOLD,
    NO_SPEECH_THRESHOLD,
    ModelNotAvailableError,
    Transcript,
    UnsupportedLanguageError,
    is_no_speech,
    transcribe_by_length,
)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; an explicit unusable "cuda" fails.

    Raises:
        ValueError: "cuda" requested but not available, or an unknown device name.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    return device


def limit_cpu_threads() -> None:
    """Cap torch's intra-op threads at the CPUs this process may use.

    torch sizes its pool from the host's cores, which in a container or under `taskset` can be
    far more than we are allowed; oversubscribed threads make every matmul slower.
    """
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if allowed and torch.get_num_threads() > allowed:
        torch.set_num_threads(allowed)


def load_checkpoint(path: Path, device: str, name: str | None = None) -> Whisper:
    """Load an openai-whisper `.pt` by path (by name `whisper.load_model` would download),
    and its tokenizer, so the first request pays for neither.

    Also applies alignment heads, which `whisper.load_model(path)` leaves at its default:
    from the checkpoint's `"alignment_heads"` (written by our converter) or, for an official
    checkpoint, openai's table for `name`.

    Raises:
        ModelNotAvailableError: the file is not an openai-whisper checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = Whisper(ModelDimensions(**checkpoint["dims"]))
        model.load_state_dict(checkpoint["model_state_dict"])
    except (EOFError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotAvailableError(
            f"{path} is not a loadable openai-whisper checkpoint "
            f"(a torch file with 'dims' and 'model_state_dict'): {reason}"
        ) from e
    # `_ALIGNMENT_HEADS` is openai's own per-model table (what load_model applies by name).
    heads = checkpoint.get("alignment_heads") or whisper._ALIGNMENT_HEADS.get(name or "")
    if heads:
        model.set_alignment_heads(heads.encode() if isinstance(heads, str) else heads)
    _warm_tokenizer(model)
    return model.to(device).eval()


class OpenAIWhisperEngine:
    """openai-whisper behind the Engine protocol: loaded once, called with batches.

    Args:
        checkpoint: a local openai-whisper `.pt` (see `convert.converted_checkpoint`).
        model_name: what clients see, e.g. "tiny.en".
        device: "auto", "cpu" or "cuda". fp16 on CUDA, fp32 on CPU (fp16 is slow or
            unsupported on CPU).
    """

    name = "openai-whisper"

    def __init__(self, checkpoint: Path, model_name: str, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model_name = model_name
        self.fp16 = self.device == "cuda"
        if self.device == "cpu":
            limit_cpu_threads()
        self._model: Whisper | None = load_checkpoint(Path(checkpoint), self.device, model_name)
        # The service may call from several threads; one forward pass at a time.
        self._lock = threading.Lock()

    @property
    def model(self) -> Whisper:
        if self._model is None:
            raise RuntimeError("engine is closed")
        return self._model

    def _language(self, language: str | None) -> str | None:
        # Same contract as the faster-whisper engine: a language the model cannot do is the
        # client's error (400), never silently transcribed as something else.
        if language is None:
            return None if self.model.is_multilingual else "en"
        language = language.lower()
        if language not in whisper.tokenizer.LANGUAGES:
            raise UnsupportedLanguageError(f"unknown language code {language!r}")
        if not self.model.is_multilingual and language != "en":
            raise UnsupportedLanguageError(
                f"model {self.model_name} is English-only; it cannot transcribe {language!r}"
            )
        return language

    def transcribe(self, batch: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        """Transcribe each 16 kHz mono clip; one Transcript per clip, in order.

        Clips up to 30 s share one batched decode; longer clips are transcribed whole,
        window by window. Silence and no-speech windows give "".
        """
        language = self._language(language)
        # Own writable copies: torch.from_numpy warns on read-only buffers (np.frombuffer).
        clips = [np.array(audio, dtype=np.float32) for audio in batch]
        with self._lock:
            return transcribe_by_length(
                clips, language,
                lambda short: self._decode_short(short, language),
                lambda audio: self._transcribe_long(audio, language, len(audio) / SAMPLE_RATE),
            )

    def _decode_short(self, clips: list[np.ndarray], language: str | None) -> list[Transcript]:
        """One batched greedy pass over clips of at most 30 s."""
        model = self.model
        mels = torch.stack(
            [
                whisper.log_mel_spectrogram(
                    whisper.pad_or_trim(torch.from_numpy(c)), n_mels=model.dims.n_mels
                )
                for c in clips
            ]
        ).to(model.device)
        options = DecodingOptions(
            language=language, without_timestamps=True, fp16=self.fp16, temperature=0.0
        )
        decoded: list[DecodingResult] = whisper.decode(model, mels, options)
        return [
            Transcript(
                "" if is_no_speech(r.no_speech_prob, r.avg_logprob) else r.text.strip(),
                r.language,
                len(c) / SAMPLE_RATE,
            )
            for r, c in zip(decoded, clips, strict=True)
        ]

    def _transcribe_long(self, audio: np.ndarray, language: str | None, duration: float) -> Transcript:
        """Sequential 30 s windows over the whole clip (whisper's own seek loop)."""
        result = self.model.transcribe(
            audio,
            language=language,
            temperature=0.0,
            fp16=self.fp16,
            # Greedy without fallback: conditioning on earlier windows is what sends
            # Whisper into repetition loops, so each window stands alone.
            condition_on_previous_text=False,
            no_speech_threshold=NO_SPEECH_THRESHOLD,
            logprob_threshold=LOGPROB_THRESHOLD,
            verbose=None,
        )
        return Transcript(str(result["text"]).strip(), str(result["language"]), duration)

    def close(self) -> None:
        """Free the model (and its GPU memory); the engine cannot be used afterwards."""
        with self._lock:
            self._model = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _warm_tokenizer(model: Whisper) -> None:
    """Load the tokenizer's vocabulary (cached by openai-whisper for the process).

    openai-whisper 20250625 leaves its vocabulary file open while reading it (tokenizer.py
    `get_encoding`); the ResourceWarning is theirs, silenced here once (the result is cached).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)

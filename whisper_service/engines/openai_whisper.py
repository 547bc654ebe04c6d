"""openai-whisper engine: batched decoding of up to 30 s clips, with Whisper's safeguards.

Throughput comes from one encoder pass over the whole batch and one batched decode of its audio
features. The temperature fallback of `whisper.transcribe` runs batched too: only the clips whose
decode failed the thresholds are decoded again, at the next temperature, from the features
already encoded (`engines.base.decode_with_fallback`).

Beam search and best-of sampling are batched as well. openai-whisper 20250625's `decode()`
crashes on a batch of more than one clip with beam_size or best_of > 1: `DecodingTask.run`
repeats the tokens by the group size but not the audio features, so cross-attention sees 4
feature rows for 20 token rows. `_GroupedDecodingTask` repeats the features to match (and
detects the language on one row per clip); a test checks a batched beam decode against the same
clips decoded one at a time. Clips longer than one 30 s window go through `model.transcribe`,
Whisper's own seek loop, with the same options.
"""

from __future__ import annotations

import gc
import os
import pickle
import threading
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import whisper
from torch import Tensor
from whisper.audio import N_FRAMES, N_SAMPLES
from whisper.decoding import DecodingOptions, DecodingResult, DecodingTask
from whisper.model import ModelDimensions, Whisper

from whisper_service.audio import SAMPLE_RATE
from whisper_service.decode_options import DecodeKnobs, DecodeOptions
from whisper_service.engines.base import (
    Attempt,
    ModelNotAvailableError,
    Transcript,
    UnsupportedLanguageError,
    check_options,
    decode_with_fallback,
    finish,
    from_segments,
    is_no_speech,
    transcribe_by_length,
)

__all__ = ["OpenAIWhisperEngine", "is_no_speech", "log_mel_window", "resolve_device"]

MelPadding = Literal["audio", "mel"]


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
        device: "auto", "cpu" or "cuda".
        knobs: decode settings; default `DecodeKnobs()`. compute_type "auto" is float16 on CUDA
            and float32 on CPU (fp16 is slow or unsupported on CPU).
        weights_sha256: content hash of the weights this checkpoint came from (the fingerprint's
            weights identity); default: the checkpoint file's own hash.
        converter_version: set when the checkpoint was converted from CTranslate2 weights.

    Raises:
        ValueError: a compute type openai-whisper cannot run on this device.
    """

    name = "openai-whisper"
    # How a short clip becomes the encoder's 30 s input (see `log_mel_window`) and whether the
    # decoder predicts timestamp tokens; bench/ow_batched_vs_sequential.py varies both.
    mel_padding: ClassVar[MelPadding] = "audio"
    timestamps: ClassVar[bool] = False

    def __init__(
        self,
        checkpoint: Path,
        model_name: str,
        device: str = "auto",
        knobs: DecodeKnobs | None = None,
        *,
        weights_sha256: str | None = None,
        converter_version: int | None = None,
    ) -> None:
        from whisper_service.engines.models import weights_sha256 as content_hash

        knobs = knobs or DecodeKnobs()
        self.device = resolve_device(device)
        self.model_name = model_name
        compute_type = _compute_type(knobs.compute_type, self.device)
        self.fp16 = compute_type == "float16"
        if self.device == "cpu":
            limit_cpu_threads()
        self._model: Whisper | None = load_checkpoint(Path(checkpoint), self.device, model_name)
        self.options = DecodeOptions.build(
            knobs,
            engine="openai-whisper",
            model=model_name,
            weights_sha256=weights_sha256 or content_hash(Path(checkpoint)),
            compute_type=compute_type,
            converter_version=converter_version,
        )
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

    def transcribe(
        self,
        batch: list[np.ndarray],
        language: str | None = None,
        options: DecodeOptions | None = None,
    ) -> list[Transcript]:
        """Transcribe each 16 kHz mono clip; one Transcript per clip, in order.

        Clips up to 30 s share one batched encode and decode (plus batched fallback decodes for
        the clips that need them); longer clips are transcribed whole, window by window.
        `language` None means `options.language`, then detection (or "en" on .en models).

        Raises:
            UnsupportedLanguageError: a language the model cannot transcribe.
            ValueError: options made for another engine or other weights.
        """
        options = check_options(self, options)
        language = self._language(language or options.language)
        # Own writable copies: torch.from_numpy warns on read-only buffers (np.frombuffer).
        clips = [np.array(audio, dtype=np.float32) for audio in batch]
        with self._lock, torch.inference_mode():
            return transcribe_by_length(
                clips, language,
                lambda short: self._decode_short(short, language, options),
                lambda audio: self._transcribe_long(audio, language, options),
            )

    def _decode_short(
        self, clips: list[np.ndarray], language: str | None, options: DecodeOptions
    ) -> list[Transcript]:
        """One encoder pass, then batched decodes with Whisper's temperature fallback."""
        model = self.model
        mels = torch.stack(
            [log_mel_window(c, model.dims.n_mels, self.mel_padding) for c in clips]
        ).to(model.device)
        features = model.embed_audio(mels.half() if self.fp16 else mels)
        if language is None:  # multilingual model, no hint: detect once per clip
            tokenizer = whisper.tokenizer.get_tokenizer(
                True, num_languages=model.num_languages, task="transcribe"
            )
            _, probs = model.detect_language(features, tokenizer)
            languages = [max(p, key=p.get) for p in probs]
            confidence: list[float | None] = [float(p[lang]) for p, lang in zip(probs, languages)]
        else:
            languages, confidence = [language] * len(clips), [None] * len(clips)

        def decode(indices: list[int], temperature: float) -> list[Attempt]:
            out: dict[int, Attempt] = {}
            for lang in dict.fromkeys(languages[i] for i in indices):  # one call per language
                group = [i for i in indices if languages[i] == lang]
                decoding = _decoding_options(options, lang, temperature, self.fp16, self.timestamps)
                results: list[DecodingResult] = _GroupedDecodingTask(model, decoding).run(
                    features[group]
                )
                for i, r in zip(group, results, strict=True):
                    out[i] = Attempt(
                        r.text, lang, float(r.avg_logprob), float(r.no_speech_prob),
                        temperature, confidence[i],
                    )
            return [out[i] for i in indices]

        kept = decode_with_fallback(len(clips), decode, options)
        return [
            finish(attempt, exhausted, len(c) / SAMPLE_RATE, options)
            for (attempt, exhausted), c in zip(kept, clips, strict=True)
        ]

    def _transcribe_long(
        self, audio: np.ndarray, language: str | None, options: DecodeOptions
    ) -> Transcript:
        """Sequential 30 s windows over the whole clip (whisper's own seek loop and fallback)."""
        result = self.model.transcribe(
            audio,
            language=language,
            temperature=options.temperatures,
            beam_size=options.beam_size if options.beam_size > 1 else None,
            best_of=options.best_of,
            fp16=self.fp16,
            initial_prompt=options.initial_prompt,
            # Each window stands alone: conditioning on earlier windows is what sends Whisper
            # into repetition loops that the fallback then has to catch.
            condition_on_previous_text=False,
            compression_ratio_threshold=options.compression_ratio_threshold,
            logprob_threshold=options.log_prob_threshold,
            no_speech_threshold=options.no_speech_threshold,
            verbose=None,
        )
        segments = [
            (
                float(s["start"]), float(s["end"]), str(s["text"]), float(s["avg_logprob"]),
                float(s["no_speech_prob"]), float(s["temperature"]), len(s["tokens"]),
            )
            for s in result["segments"]
        ]
        return from_segments(segments, str(result["language"]), len(audio) / SAMPLE_RATE, options)

    def close(self) -> None:
        """Free the model (and its GPU memory); the engine cannot be used afterwards."""
        with self._lock:
            self._model = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def log_mel_window(clip: np.ndarray, n_mels: int, padding: MelPadding) -> Tensor:
    """The (n_mels, 3000) log-mel input of one clip of up to 30 s.

    "audio": pad the samples with zeros to 30 s, then take the log-mel: the padding becomes
    frames of digital silence, at the clip's max - 8 (log10) floor, about -1 once normalised.
    "mel": what `whisper.transcribe()` (and faster-whisper) feed the encoder: the log-mel of
    the clip followed by 30 s of zeros, cut to the clip's own frames and padded with zeros
    *in the log-mel domain* (0 = a level of -4 log10, far above that floor).
    """
    audio = torch.from_numpy(clip)
    if padding == "audio":
        return whisper.log_mel_spectrogram(whisper.pad_or_trim(audio), n_mels=n_mels)
    mel = whisper.log_mel_spectrogram(audio, n_mels=n_mels, padding=N_SAMPLES)
    return whisper.pad_or_trim(mel[:, : mel.shape[-1] - N_FRAMES], N_FRAMES)


class _GroupedDecodingTask(DecodingTask):
    """`DecodingTask` with batched beam search and best-of sampling that work.

    In openai-whisper 20250625 `run()` repeats the token rows by the group size (beam_size or
    best_of) but not the audio features, so a batch of N > 1 clips crashes in cross-attention
    (N feature rows against N x group token rows). Here the features are repeated to match,
    and language detection sees one row per clip. With a group of 1 nothing changes.
    """

    def _get_audio_features(self, mel: Tensor) -> Tensor:
        features = super()._get_audio_features(mel)
        return features.repeat_interleave(self.n_group, dim=0) if self.n_group > 1 else features

    def _detect_language(self, audio_features: Tensor, tokens: Tensor):  # type: ignore[no-untyped-def]
        return super()._detect_language(audio_features[:: self.n_group], tokens)


def _decoding_options(
    options: DecodeOptions, language: str | None, temperature: float, fp16: bool, timestamps: bool
) -> DecodingOptions:
    """Whisper's per-temperature choice: beam search at 0, best-of sampling above."""
    sampling = temperature > 0
    return DecodingOptions(
        language=language,
        temperature=temperature,
        beam_size=None if sampling or options.beam_size == 1 else options.beam_size,
        best_of=options.best_of if sampling else None,
        prompt=options.initial_prompt,
        without_timestamps=not timestamps,
        fp16=fp16,
    )


def _compute_type(requested: str, device: str) -> str:
    if requested == "auto":
        return "float16" if device == "cuda" else "float32"
    if requested not in ("float16", "float32"):
        raise ValueError(
            f"openai-whisper runs float16 (CUDA) or float32, not compute type {requested!r}"
        )
    if requested == "float16" and device != "cuda":
        raise ValueError("openai-whisper cannot run float16 on CPU; use float32 or auto")
    return requested


def _warm_tokenizer(model: Whisper) -> None:
    """Load the tokenizer's vocabulary (cached by openai-whisper for the process).

    openai-whisper 20250625 leaves its vocabulary file open while reading it (tokenizer.py
    `get_encoding`); the ResourceWarning is theirs, silenced here once (the result is cached).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        whisper.tokenizer.get_tokenizer(model.is_multilingual, num_languages=model.num_languages)

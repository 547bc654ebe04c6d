"""faster-whisper (CTranslate2) engine: one batched encoder/decoder pass for short clips.

Clips of at most 30 s (Whisper's window, i.e. nearly every VCTK-style utterance) are padded to
one window each, stacked, encoded together and decoded by a single `generate` call, as in
faster-whisper's `BatchedInferencePipeline.generate_segment_batched`. Each window is padded to the
same 3000 frames whatever the batch, so a clip's text does not depend on its batch companions.
Longer clips go through `WhisperModel.transcribe` (sequential 30 s windows), one at a time.

Decoding is deterministic (beam search at temperature 0, no sampling fallback), so the same
audio gives the same text in any batch and on any rerun. Silence yields "": an RMS gate skips the
model for near-digital silence, and Whisper's own rule (no-speech probability > 0.6 and average
log-probability < -1) drops what the model itself calls non-speech.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens

from whisper_service.audio import SAMPLE_RATE
from whisper_service.engines.base import (
    ModelNotAvailableError,
    Transcript,
    UnsupportedLanguageError,
    is_no_speech,
    transcribe_by_length,
)

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CTranslate2 sees a GPU, else "cpu"; explicit values pass through."""
    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


class FasterWhisperEngine:
    """A CTranslate2 Whisper model directory (e.g. Systran's conversions) behind `Engine`.

    Not thread-safe by design: the service's batcher makes one call at a time.
    """

    name = "faster-whisper"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        compute_type: str | None = None,
        model_name: str = "tiny.en",
        *,
        beam_size: int = 5,
        cpu_threads: int | None = None,
    ) -> None:
        """Load the model from a local directory (never by name: that would download).

        Args:
            model_path: a CTranslate2 Whisper directory holding model.bin and tokenizer.json.
            device: "auto", "cpu" or "cuda".
            compute_type: CTranslate2 compute type; default float16 on CUDA, int8 on CPU.
            model_name: what responses report as the model.
            beam_size: beam width for decoding (1 = greedy).
            cpu_threads: CPU threads for one call; default all cores visible to this process.

        Raises:
            ModelNotAvailableError: `model_path` is not a CTranslate2 Whisper directory.
        """
        path = Path(model_path)
        missing = [f for f in ("model.bin", "tokenizer.json") if not (path / f).is_file()]
        if missing:
            raise ModelNotAvailableError(
                f"{path} is not a CTranslate2 Whisper model directory "
                f"(missing {', '.join(missing)})"
            )
        self.device = resolve_device(device)
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.model_name = model_name
        self.beam_size = beam_size
        threads = cpu_threads if cpu_threads is not None else len(os.sched_getaffinity(0))
        self._model: WhisperModel | None = WhisperModel(
            str(path), device=self.device, compute_type=self.compute_type, cpu_threads=threads
        )
        logger.info(
            "loaded %s on %s (%s) from %s", model_name, self.device, self.compute_type, path
        )

    def transcribe(self, batch: list[np.ndarray], language: str | None = None) -> list[Transcript]:
        """Transcribe mono 16 kHz float32 clips; one Transcript per clip, in order.

        Raises:
            UnsupportedLanguageError: `language` is unknown or not supported by this model.
        """
        model = self._loaded()
        language = self._check_language(model, language)

        def short(clips: list[np.ndarray]) -> list[Transcript]:
            texts = self._transcribe_windows(model, clips, language)
            return [Transcript(text, lang, len(c) / SAMPLE_RATE) for (text, lang), c in zip(texts, clips, strict=True)]

        return transcribe_by_length(batch, language, short, lambda audio: self._transcribe_long(model, audio, language))

    def close(self) -> None:
        """Drop the model so its memory (host or GPU) can be freed."""
        self._model = None

    def _loaded(self) -> WhisperModel:
        if self._model is None:
            raise RuntimeError("engine is closed")
        return self._model

    def _check_language(self, model: WhisperModel, language: str | None) -> str | None:
        multilingual = model.model.is_multilingual
        if language is None:
            return None if multilingual else "en"
        language = language.lower()
        if language in model.supported_languages:
            return language
        if not multilingual:
            raise UnsupportedLanguageError(
                f"model {self.model_name} is English-only; it cannot transcribe {language!r}"
            )
        raise UnsupportedLanguageError(f"unknown language code {language!r}")

    def _transcribe_windows(
        self, model: WhisperModel, clips: list[np.ndarray], language: str | None
    ) -> list[tuple[str, str]]:
        """One encoder pass and one decoder call for clips of at most 30 s."""
        features = np.stack([pad_or_trim(model.feature_extractor(a)[..., :-1]) for a in clips])
        encoded = model.encode(features)
        if language is None:  # multilingual model, no hint: detect per clip
            languages = [probs[0][0][2:-2] for probs in model.model.detect_language(encoded)]
        else:
            languages = [language] * len(clips)
        multilingual = model.model.is_multilingual
        tokenizers = {
            lang: Tokenizer(model.hf_tokenizer, multilingual, "transcribe", lang)
            for lang in set(languages)
        }
        # faster-whisper's default: punctuation-only "non-speech" tokens and the special tokens
        suppress = get_suppressed_tokens(tokenizers[languages[0]], [-1])
        prompts = [
            model.get_prompt(tokenizers[lang], [], without_timestamps=True) for lang in languages
        ]
        generated = model.model.generate(
            encoded,
            prompts,
            beam_size=self.beam_size,
            max_length=model.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(suppress),
        )
        out = []
        for lang, result in zip(languages, generated):
            tokens = result.sequences_ids[0]
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # length_penalty=1
            if is_no_speech(result.no_speech_prob, avg_logprob):
                out.append(("", lang))
            else:
                out.append((tokenizers[lang].decode(tokens).strip(), lang))
        return out

    def _transcribe_long(
        self, model: WhisperModel, audio: np.ndarray, language: str | None
    ) -> Transcript:
        """Whole-clip long-form transcription, window after window."""
        # No prompt conditioning: without the sampling fallback it is what stops repetition loops.
        segments, info = model.transcribe(
            audio,
            language=language,
            beam_size=self.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            vad_filter=False,
        )
        text = "".join(segment.text for segment in segments).strip()
        return Transcript(text, info.language, len(audio) / SAMPLE_RATE)

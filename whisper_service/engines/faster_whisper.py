"""faster-whisper (CTranslate2) engine: one batched encoder/decoder pass for short clips.

Clips of at most 30 s (Whisper's window, i.e. nearly every VCTK-style utterance) are padded to
one window each, stacked, encoded together and decoded by a single `generate` call, as in
faster-whisper's `BatchedInferencePipeline.generate_segment_batched`, with the prompt, timestamp
and seek rules of `WhisperModel.transcribe`, so a clip's text is the one that loop gives: where
a decode stops before the clip's end, the rest is decoded in a next window (`engines.seek`).
Each window is padded to the same 3000 frames whatever the batch, so a clip's text does not
depend on its batch companions.
CTranslate2 batches beam search itself. Whisper's temperature fallback runs batched on top:
only the clips whose decode failed the thresholds are decoded again, at the next temperature,
with best-of sampling (`engines.base.decode_with_fallback`), on the encoder output of the first
pass (never re-encoded, as in faster-whisper's loop). Longer clips go through
`WhisperModel.transcribe` (sequential 30 s windows, its own fallback), one at a time.

Silence yields "": an RMS gate skips the model for near-digital silence, and Whisper's own rule
(no-speech probability > 0.6 and average log-probability < -1) drops what the model itself calls
non-speech.
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
from whisper_service.decode_options import DecodeKnobs, DecodeOptions
from whisper_service.engines.base import (
    Attempt,
    DecodeAt,
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
from whisper_service.engines.seek import FRAMES_PER_SECOND, Stretch, WindowSplit, split_window

logger = logging.getLogger(__name__)

# faster-whisper's `transcribe()` defaults, kept so a short clip decodes exactly as there: with
# timestamp tokens (without them, tiny.en's beam-5 WER on 2-5 s espeak-ng sentences was ~0.015-0.03
# worse than the loop's), the first one at most 1.0 s (in 0.02 s steps) into the window.
MAX_INITIAL_TIMESTAMP_INDEX = 50
N_FRAMES = 3000  # mel frames in one 30 s window
PROMPT_RESET_ON_TEMPERATURE = 0.5  # transcribe()'s: a window kept at a higher one prompts nothing
# Looks at one clip of <= 30 s. Each look starts where the last closed stretch ended, so one or
# two are the rule; the cap bounds what a clip that keeps stopping early can cost the service.
MAX_WINDOWS = 6

# One look at a clip: kept attempt, exhausted, split (None: no speech), seek, stretches said (with text).
Window = tuple[Attempt, bool, WindowSplit | None, int, list[tuple[Stretch, str]]]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CTranslate2 sees a GPU, else "cpu"; explicit values pass through."""
    if device == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


class FasterWhisperEngine:
    """A CTranslate2 Whisper model directory (e.g. Systran's conversions) behind `Engine`.

    `transcribe` may be called from `workers` threads at once (each call keeps its state local;
    CTranslate2 runs up to `workers` encoder/decoder calls side by side, one per replica).
    """

    name = "faster-whisper"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        knobs: DecodeKnobs | None = None,
        model_name: str = "tiny.en",
        *,
        cpu_threads: int | None = None,
        workers: int = 1,
        weights_sha256: str | None = None,
    ) -> None:
        """Load the model from a local directory (never by name: that would download).

        Args:
            model_path: a CTranslate2 Whisper directory holding model.bin and tokenizer.json.
            device: "auto", "cpu" or "cuda".
            knobs: decode settings; compute_type "auto" is float16 on CUDA, int8 on CPU.
            model_name: what responses report as the model.
            cpu_threads: CPU threads for one call; default: the cores visible to this process
                shared out among `workers`.
            workers: engine calls that may run at the same time (CTranslate2 `inter_threads`),
                each on `cpu_threads` threads; calls beyond that wait inside CTranslate2.
            weights_sha256: the directory's content hash, if the caller has it already.

        Raises:
            ModelNotAvailableError: `model_path` is not a CTranslate2 Whisper directory.
            ValueError: a compute type CTranslate2 cannot run here.
        """
        from whisper_service.engines.models import weights_sha256 as content_hash

        knobs = knobs or DecodeKnobs()
        path = Path(model_path)
        missing = [f for f in ("model.bin", "tokenizer.json") if not (path / f).is_file()]
        if missing:
            raise ModelNotAvailableError(
                f"{path} is not a CTranslate2 Whisper model directory "
                f"(missing {', '.join(missing)})"
            )
        self.device = resolve_device(device)
        compute_type = knobs.compute_type
        if compute_type == "auto":
            compute_type = "float16" if self.device == "cuda" else "int8"
        self.compute_type = compute_type
        self.model_name = model_name
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        self.workers = workers
        threads = cpu_threads if cpu_threads is not None else max(1, len(os.sched_getaffinity(0)) // workers)
        self._model: WhisperModel | None = WhisperModel(
            str(path), device=self.device, compute_type=self.compute_type, cpu_threads=threads,
            num_workers=workers,
        )
        self.options = DecodeOptions.build(
            knobs,
            engine="faster-whisper",
            model=model_name,
            weights_sha256=weights_sha256 or content_hash(path),
            compute_type=compute_type,
        )
        logger.info(
            "loaded %s on %s (%s) from %s", model_name, self.device, self.compute_type, path
        )

    def transcribe(
        self,
        batch: list[np.ndarray],
        language: str | None = None,
        options: DecodeOptions | None = None,
    ) -> list[Transcript]:
        """Transcribe mono 16 kHz float32 clips; one Transcript per clip, in order.

        `language` None means `options.language`, then detection (or "en" on .en models).

        Raises:
            UnsupportedLanguageError: `language` is unknown or not supported by this model.
            ValueError: options made for another engine or other weights.
        """
        options = check_options(self, options)
        model = self._loaded()
        language = self._check_language(model, language or options.language)
        return transcribe_by_length(
            batch, language,
            lambda clips: self._transcribe_windows(model, clips, language, options),
            lambda audio: self._transcribe_long(model, audio, language, options),
        )

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
        self,
        model: WhisperModel,
        clips: list[np.ndarray],
        language: str | None,
        options: DecodeOptions,
    ) -> list[Transcript]:
        """Whisper's seek loop, run batched over clips of at most 30 s.

        Round one encodes every clip's window and decodes them in one call (then batched
        fallback decodes for the clips that failed the thresholds). A clip whose decode stopped
        before the end of its audio (`seek.split_window`) is looked at again from its last
        timestamp, as `transcribe()` does, in a next round shared by all such clips and prompted
        with the clip's text so far (`condition_on_previous_text`, `transcribe()`'s default).
        """
        mels = [model.feature_extractor(a)[..., :-1] for a in clips]
        frames = [m.shape[-1] for m in mels]
        multilingual = model.model.is_multilingual
        languages: list[str] = [language or ""] * len(clips)
        confidence: list[float | None] = [None] * len(clips)
        tokenizers: dict[str, Tokenizer] = {}
        over = options.no_timestamps_over_s
        plain = [over is not None and len(c) > over * SAMPLE_RATE for c in clips]
        seeks = [0] * len(clips)
        history: list[list[int]] = [[] for _ in clips]  # transcribe()'s all_tokens, per clip
        reset_since = [0] * len(clips)
        windows: list[list[Window]] = [[] for _ in clips]

        def look(pending: list[int]) -> list[int]:
            """One window of each of these clips, from its seek: the clips that need another."""
            encoded = model.encode(np.stack([pad_or_trim(mels[i][:, seeks[i]:]) for i in pending]))
            if seeks[pending[0]] == 0 and language is None:  # first look, multilingual, no hint
                for i, (token, p) in zip(pending, (r[0] for r in model.model.detect_language(encoded)), strict=True):
                    languages[i], confidence[i] = token[2:-2], float(p)
            for lang in set(languages) - set(tokenizers):
                tokenizers[lang] = Tokenizer(model.hf_tokenizer, multilingual, "transcribe", lang)
            if seeks[pending[0]] == 0:
                for i in pending:
                    history[i] = self._initial_tokens(tokenizers[languages[i]], options)
            prompts = [
                model.get_prompt(tokenizers[languages[i]], history[i][reset_since[i]:], without_timestamps=plain[i])
                for i in pending
            ]
            decode = self._decoder(model, encoded, prompts, [languages[i] for i in pending],
                                   [confidence[i] for i in pending], tokenizers, options)
            again = []
            for i, (attempt, exhausted) in zip(pending, decode_with_fallback(len(pending), decode, options), strict=True):
                size = min(N_FRAMES, frames[i] - seeks[i])
                split, said = None, []
                if is_no_speech(attempt.no_speech_prob, attempt.avg_logprob,
                                options.no_speech_threshold, options.log_prob_threshold):
                    advance = size  # transcribe() skips the window
                else:
                    split = split_window(list(attempt.tokens), tokenizers[languages[i]].timestamp_begin, size)
                    advance = split.advance
                    # transcribe() keeps (and prompts with) only stretches with a length and a text
                    said = [(stretch, text) for stretch in split.stretches
                            if stretch.start != stretch.end
                            and (text := tokenizers[languages[i]].decode(stretch.tokens)).strip()]
                    for stretch, _ in said:
                        history[i].extend(stretch.tokens)
                windows[i].append((attempt, exhausted, split, seeks[i], said))
                if attempt.temperature > PROMPT_RESET_ON_TEMPERATURE:
                    reset_since[i] = len(history[i])
                seeks[i] += advance
                if seeks[i] < frames[i] and len(windows[i]) < MAX_WINDOWS:
                    again.append(i)
            return again

        pending = list(range(len(clips)))
        while pending:
            # CTranslate2 wants one prompt layout per call: with and without timestamps apart.
            pending = [i for flag in (False, True) if (group := [i for i in pending if plain[i] == flag])
                       for i in look(group)]
        return [
            self._clip_transcript(w, len(c) / SAMPLE_RATE, options)
            for i, (w, c) in enumerate(zip(windows, clips, strict=True))
        ]

    @staticmethod
    def _decoder(
        model: WhisperModel,
        encoded: ctranslate2.StorageView,
        prompts: list[list[int]],
        languages: list[str],
        confidence: list[float | None],
        tokenizers: dict[str, Tokenizer],
        options: DecodeOptions,
    ) -> DecodeAt:
        """`decode(indices, temperature)` over one round's encoded windows."""
        # faster-whisper's default: punctuation-only "non-speech" tokens and the special tokens
        suppress = list(get_suppressed_tokens(tokenizers[languages[0]], [-1]))

        def decode(indices: list[int], temperature: float) -> list[Attempt]:
            subset = encoded if len(indices) == len(prompts) else _rows(encoded, indices)
            if temperature > 0:  # faster-whisper's own choice: best-of sampling, no beam
                kwargs = {
                    "beam_size": 1, "num_hypotheses": options.best_of,
                    "sampling_topk": 0, "sampling_temperature": temperature,
                }
            else:
                kwargs = {"beam_size": options.beam_size}
            generated = model.model.generate(
                subset,
                [prompts[i] for i in indices],
                max_length=model.max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=suppress,
                max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
                **kwargs,
            )
            attempts = []
            for i, result in zip(indices, generated, strict=True):
                tokens = result.sequences_ids[0]
                # scores are length-normalised (length_penalty=1): back to Whisper's avg_logprob
                avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
                attempts.append(
                    Attempt(
                        tokenizers[languages[i]].decode(tokens).strip(), languages[i],
                        float(avg_logprob), float(result.no_speech_prob), temperature,
                        confidence[i], tuple(tokens),
                    )
                )
            return attempts

        return decode

    @staticmethod
    def _clip_transcript(
        windows: list[Window],
        duration: float,
        options: DecodeOptions,
    ) -> Transcript:
        """One window that covered the clip (the rule): its decode, as always. Several, or text
        past the audio's end: the stretches each window kept, joined as `transcribe()` joins its
        segments."""
        first, exhausted, split, _, _ = windows[0]
        if len(windows) == 1 and (split is None or (split.covered and not split.dropped)):
            return finish(first, exhausted, duration, options)
        kept = [
            (seek / FRAMES_PER_SECOND + stretch.start, seek / FRAMES_PER_SECOND + stretch.end, text,
             attempt.avg_logprob, attempt.no_speech_prob, attempt.temperature, len(stretch.tokens))
            for attempt, _, _, seek, said in windows  # a no-speech window said nothing: skipped
            for stretch, text in said
        ]
        return from_segments(kept, first.language, duration, options, first.language_probability)

    @staticmethod
    def _initial_tokens(tokenizer: Tokenizer, options: DecodeOptions) -> list[int]:
        return tokenizer.encode(" " + options.initial_prompt) if options.initial_prompt else []

    def _transcribe_long(
        self, model: WhisperModel, audio: np.ndarray, language: str | None, options: DecodeOptions
    ) -> Transcript:
        """Whole-clip long-form transcription, window after window, with its own fallback."""
        segments, info = model.transcribe(
            audio,
            language=language,
            beam_size=options.beam_size,
            best_of=options.best_of,
            temperature=list(options.temperatures),
            compression_ratio_threshold=options.compression_ratio_threshold,
            log_prob_threshold=options.log_prob_threshold,
            no_speech_threshold=options.no_speech_threshold,
            initial_prompt=options.initial_prompt,
            # Each window stands alone: conditioning on earlier windows feeds repetition loops.
            condition_on_previous_text=False,
            vad_filter=False,
        )
        kept = [
            (s.start, s.end, s.text, s.avg_logprob, s.no_speech_prob, s.temperature, len(s.tokens))
            for s in segments
        ]
        probability = info.language_probability if language is None else None
        return from_segments(kept, info.language, len(audio) / SAMPLE_RATE, options, probability)


def _rows(encoded: ctranslate2.StorageView, indices: list[int]) -> ctranslate2.StorageView:
    """The encoder output of just these clips, for a fallback re-decode.

    Why: re-encoding a window costs as much as the first pass (~0.5 s per clip on a 2-core CPU,
    most of a short clip's cost), and faster-whisper's own loop reuses its encoder output across
    the whole temperature ladder. The rows are copied through host memory (1500 x d_model floats
    per clip: ~2 MB for tiny), which is bit-identical to re-encoding since every window is padded
    to the same 3000 frames.
    """
    device = encoded.device
    host = encoded if device == "cpu" else encoded.to_device(ctranslate2.Device.cpu)
    rows = np.ascontiguousarray(np.asarray(host)[indices])
    subset = ctranslate2.StorageView.from_array(rows)  # holds a reference to `rows`
    return subset if device == "cpu" else subset.to_device(ctranslate2.Device.cuda)

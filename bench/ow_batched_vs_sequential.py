"""Which difference between openai-whisper's sequential `transcribe()` and batched `decode()` costs WER.

    uv run python -m bench.ow_batched_vs_sequential --hard DIR [--words DIR] [--device cpu]

Issue 12: on 181 real clips `whisper.transcribe()` (greedy, temperature 0, timestamps on) scored
WER 0.386 and the batched `decode()` path 0.50. This isolates the decoding differences on the
corpora we have (demo, the bench/quality.py hard corpus, isolated espeak-ng words), all with
tiny.en, greedy at temperature 0 without fallback (and, apart, with the service's default
ladder), and the same no-speech rule (skip when
no_speech_prob > 0.6 and avg_logprob < -1.0, as `transcribe()` applies it):

- `sequential`: `model.transcribe()` per clip (its defaults: timestamps, condition_on_previous_text).
- `greedy[pad=..,ts=..]`: the service engine's batched path (all clips in one encode and one
  decode), greedy at temperature 0 only, varying one thing at a time. `pad=audio` pads the
  *samples* to 30 s, then takes the log-mel (the engine before this bench: the padding becomes
  log-mel frames of silence, clamped at the clip's max - 8 and normalised to about -1);
  `pad=mel` keeps the clip's own log-mel frames and pads the *mel* with zeros to 3000 frames
  (`transcribe()`: `mel[:, seek:seek+N]`, then `pad_or_trim`). `ts=1`: `without_timestamps=False`,
  the text being the tokens without the timestamp tokens. `pad=audio,ts=0` is the engine as it was.
- `greedy[pad=mel,ts=1,seek=1]` (on request): also `transcribe()`'s window rule: when the decode
  ends inside an unfinished segment, that segment is dropped and the clip decoded again from its
  last timestamp (a second batched round, not conditioned on the first round's text).
- `fallback[...]`: the same with the service's default options (Whisper's temperature ladder).

Reported per variant and corpus: WER (tests/wer.py), seconds, empty outputs, the clips whose text
differs from `sequential`, and every text. JSON: bench/results/ow-batched-vs-sequential-<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES

from bench.common import DEMO_AUDIO, machine, write_json
from bench.quality import load_corpus, make_hard_corpus
from tests.wer import wer
from whisper_service.decode_options import DecodeOptions
from whisper_service.engines.openai_whisper import log_mel_window

NO_SPEECH, LOGPROB = 0.6, -1.0
# Isolated words (issue 12: "5 of 181 real words came back empty"), two espeak-ng voices.
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "zero",
         "yes", "no", "stop", "go", "left", "right", "up", "down", "water", "hello"]
WORD_VOICES = {"w0": ("en-us", 130), "w1": ("en-gb", 160)}


def make_words_corpus(root: Path) -> None:
    """Write audio/ + references.json of single spoken words under `root`, unless there."""
    if (root / "references.json").is_file():
        return
    from tests.fixtures.speech import speak

    references = {}
    for speaker, (voice, speed) in WORD_VOICES.items():
        for j, word in enumerate(WORDS):
            clip_id = f"{speaker}/{speaker}_{j:03d}.flac"
            speak(word, voice, root / "audio" / clip_id, speed)
            references[clip_id] = word
    (root / "references.json").write_text(json.dumps(references, indent=1, sort_keys=True) + "\n")


def mel_of(clip: np.ndarray, mode: str, seek: int = 0) -> torch.Tensor:
    """(80, 3000) log-mel of one clip from frame `seek`, prepared as `mode` says."""
    if mode == "audio":
        return log_mel_window(clip[seek * HOP_LENGTH :], 80, "audio")
    mel = whisper.log_mel_spectrogram(torch.from_numpy(clip), padding=N_SAMPLES)  # transcribe()'s own call
    content = mel.shape[-1] - N_FRAMES
    return whisper.pad_or_trim(mel[:, seek:content], N_FRAMES)


def content_frames(clip: np.ndarray) -> int:
    return whisper.log_mel_spectrogram(torch.from_numpy(clip), padding=N_SAMPLES).shape[-1] - N_FRAMES


def batched(model, clips: list[np.ndarray], mel: str, timestamps: bool, seek: bool) -> list[str]:
    """One batched encode + greedy decode of all clips (and, with `seek`, a second batched round
    for the clips whose decode stopped inside an unfinished segment)."""
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    begin = tokenizer.timestamp_begin
    options = whisper.DecodingOptions(language="en", temperature=0.0, without_timestamps=not timestamps, fp16=False)
    positions = [0] * len(clips)
    limits = [content_frames(c) for c in clips]
    texts: list[list[int]] = [[] for _ in clips]
    pending = list(range(len(clips)))
    while pending:
        mels = torch.stack([mel_of(clips[i], mel, positions[i]) for i in pending]).to(model.device)
        results = whisper.decode(model, model.embed_audio(mels), options)
        again = []
        for i, r in zip(pending, results, strict=True):
            if r.no_speech_prob > NO_SPEECH and r.avg_logprob < LOGPROB:
                continue  # transcribe() skips the window
            tokens = list(r.tokens)
            if not (timestamps and seek):
                texts[i] += tokens
                continue
            is_ts = [t >= begin for t in tokens]
            single_ending = is_ts[-2:] == [False, True]
            consecutive = [k + 1 for k in range(len(tokens) - 1) if is_ts[k] and is_ts[k + 1]]
            if consecutive and not single_ending:
                last = consecutive[-1]
                kept = tokens[:last]
                texts[i] += _segment_tokens(kept, begin)
                positions[i] += (tokens[last - 1] - begin) * 2
                if positions[i] < limits[i]:
                    again.append(i)
            else:
                texts[i] += _segment_tokens(tokens, begin) if consecutive else tokens
        pending = again
    return [tokenizer.decode(t).strip() for t in texts]


def _segment_tokens(tokens: list[int], begin: int) -> list[int]:
    """Tokens of the segments transcribe() keeps: instantaneous segments (start == end) cleared."""
    is_ts = [t >= begin for t in tokens]
    cuts = [k + 1 for k in range(len(tokens) - 1) if is_ts[k] and is_ts[k + 1]]
    if is_ts[-2:] == [False, True]:
        cuts.append(len(tokens))
    out, last = [], 0
    for cut in cuts:
        piece = tokens[last:cut]
        if piece and piece[0] != piece[-1]:
            out += piece
        last = cut
    return out


def sequential(model, clips: list[np.ndarray]) -> list[str]:
    return [
        model.transcribe(c, language="en", temperature=0.0, fp16=False, verbose=None)["text"].strip()
        for c in clips
    ]


def engine_variant(engine, padding: str, timestamps: bool):
    """The service engine with another mel padding / timestamp mode (class attributes)."""
    variant = type("Variant", (type(engine),), {"mel_padding": padding, "timestamps": timestamps})
    clone = object.__new__(variant)
    clone.__dict__.update(engine.__dict__)
    return clone


def spelled_digits(text: str) -> str:
    """"2" -> "two": tests/wer.py counts a digit for a spoken number word as an error."""
    return re.sub(r"\b(\d)\b", lambda m: DIGITS[int(m.group(1))], text)


DIGITS = "zero one two three four five six seven eight nine".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hard", type=Path, required=True, help="bench/quality.py's hard corpus, made here on first use.")
    parser.add_argument("--words", type=Path, default=None, help="Isolated words corpus (default: HARD/../words).")
    parser.add_argument("--variants", default="", help="Semicolon-separated subset of variants to run (default: all but seek).")
    args = parser.parse_args()

    from whisper_service.engines import load_engine

    make_hard_corpus(args.hard)
    words_dir = args.words or args.hard.parent / "words"
    make_words_corpus(words_dir)
    corpora = {"demo": load_corpus(DEMO_AUDIO.parent), "hard": load_corpus(args.hard), "words": load_corpus(words_dir)}

    engine = load_engine("openai-whisper", "tiny.en", args.device)
    model = engine.model  # type: ignore[attr-defined]
    greedy = DecodeOptions.model_validate(engine.options.model_dump() | {"beam_size": 1, "temperatures": (0.0,)})
    default = engine.options  # the service's default: greedy + Whisper's fallback ladder
    variants = {"sequential": lambda clips: sequential(model, clips)}
    for options, tag in ((greedy, "greedy"), (default, "fallback")):
        for padding, ts in (("audio", False), ("audio", True), ("mel", False), ("mel", True)):
            if tag == "fallback" and (padding, ts) == ("audio", True):
                continue
            name = f"{tag}[pad={padding},ts={int(ts)}]"
            variants[name] = lambda clips, e=engine_variant(engine, padding, ts), o=options: [
                t.text for t in e.transcribe(clips, None, o)
            ]
    # transcribe()'s window rule on top (a second, batched round from the last timestamp).
    variants["greedy[pad=mel,ts=1,seek=1]"] = lambda clips: batched(model, clips, "mel", True, True)
    chosen = [v for v in args.variants.split(";") if v] or [v for v in variants if "seek" not in v]

    engine.transcribe([corpora["demo"][1][0]])  # warm-up
    rows, texts = [], {}
    with torch.inference_mode():
        for corpus, (ids, clips, refs) in corpora.items():
            for name in chosen:
                started = time.perf_counter()
                out = variants[name](clips)
                seconds = time.perf_counter() - started
                texts[(corpus, name)] = out
                row = {
                    "variant": name, "corpus": corpus, "clips": len(clips),
                    "audio_s": round(sum(len(c) for c in clips) / 16_000, 2),
                    "wer": round(wer(refs, out), 4),
                    "wer_digits_spelled": round(wer(refs, [spelled_digits(t) for t in out]), 4),
                    "seconds": round(seconds, 2),
                    "empty": sum(not t for t in out),
                }
                if name != "sequential" and (corpus, "sequential") in texts:
                    seq = texts[(corpus, "sequential")]
                    row["differs_from_sequential"] = sum(s != t for s, t in zip(seq, out, strict=True))
                row["texts"] = dict(zip(ids, out, strict=True))
                rows.append(row)
                print(f"{corpus:5s} {name:28s} WER {row['wer']:.3f} ({row['wer_digits_spelled']:.3f}) "
                      f"{seconds:6.1f}s empty {row['empty']} differs {row.get('differs_from_sequential', '-')}",
                      flush=True)
    engine.close()
    write_json("ow-batched-vs-sequential", {
        "machine": machine(), "device": args.device, "model": "tiny.en",
        "decoding": "greedy: greedy, temperature 0, no fallback; fallback: the service default "
        "(greedy + ladder 0.0..1.0, best-of 5); no-speech rule 0.6 / -1.0 in both",
        "references": {c: dict(zip(ids, refs, strict=True)) for c, (ids, _, refs) in corpora.items()},
        "results": rows,
    })


if __name__ == "__main__":
    main()

"""The tokenisation stage of a shard: decode audio, tokenise batch by batch, write intermediates."""

from __future__ import annotations

import functools
import json
import numpy as np

from tasks.audio_quality import decode_for_tokens, measure
from tasks.audio_stream import open_source, read_span
from tasks.folder_index import reusable_ids
from tasks.provenance import tokens_reusable
from tasks.records import AudioFile, AudioQuality, Batch, Failure, Provenance, StageReport, Tokens
from tasks.settings import PipelineSettings
from tasks.storage import Store, read_source
from tasks.tokenisers import Tokeniser, get_tokeniser
from whisper_service.audio import AudioDecodeError


@functools.lru_cache(maxsize=4)
def _cached_tokeniser(name: str, device: str, options_json: str) -> Tokeniser:
    return get_tokeniser(name, device=device, **json.loads(options_json))


def tokeniser_for(settings: PipelineSettings) -> Tokeniser:
    """One tokeniser per worker process and settings: built once, reused by every batch."""
    options = json.dumps(settings.tokenizer_options, sort_keys=True)
    return _cached_tokeniser(settings.tokenizer, settings.tokenizer_device, options)


def tokenise_batches(
    batches: list[Batch], settings: PipelineSettings, store: Store, expect: Provenance, shard: int = 0,
    spans: dict[str, tuple[float, float]] | None = None,
) -> StageReport:
    """Tokenise every file this run cannot reuse, one tokeniser call per batch.

    Reuse is decided once for the shard from each folder's slim index (`tasks.folder_index`:
    keys only, no tokens). Each decode also measures the audio (`decode_for_tokens`), kept in the
    intermediate, which carries `expect.run_id`. A file in `spans` is a segment of a long
    recording: exactly its span is decoded (by seeking) and tokenised (rpq: 25 tokens/s of it).

    Raises:
        ValueError, ImportError: the tokeniser cannot be built (the whole stage fails; merge
            reports every file missing its tokens with this reason).
    """
    spans = spans or {}
    tokeniser = tokeniser_for(settings)
    # JSON round trip so the record stores what a later comparison will read back (tuples -> lists).
    fingerprint = json.loads(json.dumps(tokeniser.settings))
    reused = reusable_ids(store, "tokens", (f for b in batches for f in b.files), expect, tokens_reusable)
    files = done = failed = 0
    audio_seconds = 0.0
    for batch in batches:
        files += len(batch.files)
        todo = [f for f in batch.files if f.id not in reused]
        decoded: list[tuple[AudioFile, np.ndarray, AudioQuality]] = []
        for f in todo:
            try:
                span = spans.get(f.id)
                decoded.append((f, *(
                    decode_for_tokens(read_source(f.path), tokeniser.sample_rate) if span is None
                    else decode_span_for_tokens(f.path, *span, tokeniser.sample_rate)
                )))
            except (AudioDecodeError, OSError) as e:
                store.write_record("tokens", Failure(id=f.id, stage="decode", error=str(e), source=f.source))
                failed += 1
            except (ValueError, RuntimeError, MemoryError) as e:
                # Not an AudioDecodeError, yet still this one file's fault (a decoder surprise, as
                # total_samples=0 FLACs once were): it must not fail the shard's other files.
                error = f"cannot decode: {type(e).__name__}: {e}"
                store.write_record("tokens", Failure(id=f.id, stage="decode", error=error, source=f.source))
                failed += 1
        if not decoded:
            continue
        arrays = [(f, audio) for f, audio, _ in decoded]
        for (f, audio, quality), tokens in zip(decoded, _tokenise_isolated(tokeniser, arrays), strict=True):
            if isinstance(tokens, str):
                store.write_record("tokens", Failure(id=f.id, stage="tokenise", error=tokens, source=f.source))
                failed += 1
                continue
            store.write_record("tokens", Tokens(
                id=f.id, token_array=[int(t) for t in tokens], tokenizer=tokeniser.name,
                tokenizer_settings=fingerprint, source=f.source, audio=quality, run_id=expect.run_id,
            ))
            audio_seconds += len(audio) / tokeniser.sample_rate
            done += 1
    return StageReport(
        stage="tokenise", shard=shard, files=files, done=done,
        reused=files - done - failed, failed=failed, audio_seconds=audio_seconds,
    )


def decode_span_for_tokens(path: str, start: float, end: float, sample_rate: int) -> tuple[np.ndarray, AudioQuality]:
    """`decode_for_tokens` for one segment: its span only, measured like a whole clip.

    Raises:
        AudioDecodeError, OSError: the span cannot be read.
    """
    with open_source(path) as f:
        audio, source_rate, channels, clipped = read_span(f, start, end, sample_rate)
    return audio, measure(audio, sample_rate, source_rate, channels, clipped)


def _tokenise_isolated(tokeniser: Tokeniser, decoded: list[tuple[AudioFile, np.ndarray]]) -> list[list[int] | str]:
    """The batch call; if it fails, each file alone, so one bad input costs only itself."""
    arrays = [audio for _, audio in decoded]
    try:
        return list(tokeniser.tokenise(arrays))
    except (RuntimeError, ValueError) as batch_error:
        if len(arrays) == 1:
            return [f"tokeniser failed: {batch_error}"]
    results: list[list[int] | str] = []
    for audio in arrays:
        try:
            results.append(tokeniser.tokenise([audio])[0])
        except (RuntimeError, ValueError) as e:
            results.append(f"tokeniser failed: {e}")
    return results


# -- Prefect task ------------------------------------------------------------------------------
from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402


@task(name="tokenise-shard", task_run_name="tokenise-shard-{index}", retries=1,
      retry_delay_seconds=5, cache_policy=NO_CACHE)
def tokenise_shard(plan: str, index: int, settings: PipelineSettings) -> StageReport:
    """Tokenise every batch of shard `index` of the run plan at `plan` (on the worker's GPU if any)."""
    from tasks.plan import load_plan, load_shard

    from tasks.long_plan import expand_shard

    run, shard = load_plan(plan), load_shard(plan, index)
    batches, spans = expand_shard(plan, index, shard.batches, settings, run.settings)  # long files: their segments
    return tokenise_batches(batches, settings, Store(settings.results_root), run.provenance, index, spans)

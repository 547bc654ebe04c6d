"""Whether a stored intermediate counts for this run, and if not, a precise reason why not.

Two questions with one set of checks:
- reuse (a stage skips the file): only records whose every input matches `Provenance`, including a
  non-empty decode fingerprint: a service that names no fingerprint gives no model identity, so
  nothing it produced is reusable;
- acceptance (merge joins the record into a line): the same checks, except that with no fingerprint
  on either side the record is taken as this run's own output (the stage redid every file).

What changes a transcript: the audio (source size/mtime), the decode fingerprint (engine, weights
content hash, decode options, from the service's `/healthz`) and the requested language. What
changes tokens: the audio and the tokeniser's settings. Those inputs, and nothing else, make a
record's key (`transcription_key`, `tokens_key`): what the slim folder index stores per file, so a
stage decides reuse without reading any text or tokens.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tasks.records import AudioFile, Failure, Provenance, Record, SourceInfo, Tokens, Transcription

Stored = Transcription | Tokens | Failure | None


def transcription_problem(record: Stored, file: AudioFile, expect: Provenance) -> str | None:
    """None when `record` is a transcription this run would have produced; else what differs."""
    if record is None:
        return "none stored"
    if isinstance(record, Failure):
        return f"the stored {record.stage} failure is for {_version(record.source, file.source)}"
    if not isinstance(record, Transcription):
        return "the stored record is not a transcription"
    if record.source != file.source:
        return f"stale transcription of {_version(record.source, file.source)}"
    wanted = expect.decode_fingerprint or ""
    if record.decode_fingerprint != wanted:
        by = " ".join(x for x in (record.engine, record.model) if x) or "an unknown model"
        return (
            f"stale transcription from {by} (decode fingerprint {_short(record.decode_fingerprint)}, "
            f"this run's is {_short(wanted)})"
        )
    if record.requested_language != expect.language:
        return (
            f"stale transcription requested in language {record.requested_language or 'auto'} "
            f"(this run asks for {expect.language or 'auto'})"
        )
    return None


def tokens_problem(record: Stored, file: AudioFile, expect: Provenance) -> str | None:
    """None when `record` holds the tokens this run would have produced; else what differs."""
    if record is None:
        return "none stored"
    if isinstance(record, Failure):
        return f"the stored {record.stage} failure is for {_version(record.source, file.source)}"
    if not isinstance(record, Tokens):
        return "the stored record is not tokens"
    if record.source != file.source:
        return f"stale tokens of {_version(record.source, file.source)}"
    if record.tokenizer_settings != expect.tokenizer_settings:
        return (
            f"stale tokens from tokeniser settings {_settings_diff(record.tokenizer_settings, expect.tokenizer_settings)}"
        )
    return None


def transcription_reusable(record: Stored, file: AudioFile, expect: Provenance) -> bool:
    """A stage may skip the file: same audio, same decode fingerprint (known), same language."""
    return bool(expect.decode_fingerprint) and transcription_problem(record, file, expect) is None


def tokens_reusable(record: Stored, file: AudioFile, expect: Provenance) -> bool:
    return tokens_problem(record, file, expect) is None


class TranscriptionKey(Record):
    """What made a transcription: equal keys, equal text (given a non-empty fingerprint)."""

    source: SourceInfo
    decode_fingerprint: str
    requested_language: str | None


class TokensKey(Record):
    """What made tokens: the audio and a hash of the tokeniser's settings (a few bytes, not the dict)."""

    source: SourceInfo
    settings_sha256: str


def settings_sha256(settings: dict[str, Any]) -> str:
    """Canonical JSON's hash. Two equal dicts that serialise differently (1 vs 1.0) only cost a
    read of the intermediate, whose full settings are then compared."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def transcription_key(record: Transcription) -> TranscriptionKey:
    return TranscriptionKey(
        source=record.source, decode_fingerprint=record.decode_fingerprint, requested_language=record.requested_language
    )


def tokens_key(record: Tokens) -> TokensKey:
    return TokensKey(source=record.source, settings_sha256=settings_sha256(record.tokenizer_settings))


def wanted_transcription_key(file: AudioFile, expect: Provenance) -> TranscriptionKey | None:
    """The key of a transcription this run may reuse; None when nothing is reusable (no fingerprint)."""
    if not expect.decode_fingerprint:
        return None
    return TranscriptionKey(source=file.source, decode_fingerprint=expect.decode_fingerprint,
                            requested_language=expect.language)


def wanted_tokens_key(file: AudioFile, expect: Provenance, settings_hash: str | None = None) -> TokensKey:
    """`settings_hash`: `settings_sha256(expect.tokenizer_settings)`, computed once per folder by callers."""
    return TokensKey(source=file.source, settings_sha256=settings_hash or settings_sha256(expect.tokenizer_settings))


def own_failure(record: Stored, file: AudioFile) -> Failure | None:
    """A failure recorded for this version of the file (a reason merge can report as is)."""
    return record if isinstance(record, Failure) and record.source == file.source else None


def _version(stored: SourceInfo, current: SourceInfo) -> str:
    if stored == current:
        return "this version of the file"
    return (
        f"an older version of the file (size {stored.size}, mtime {stored.mtime}; "
        f"now size {current.size}, mtime {current.mtime})"
    )


def _short(fingerprint: str) -> str:
    return fingerprint[:12] if fingerprint else "none"


def _settings_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Only the keys that differ, so a reason stays one readable line."""
    keys = sorted(set(stored) | set(wanted), key=lambda k: (k != "name", k))
    differ = [k for k in keys if stored.get(k) != wanted.get(k)]
    return "; ".join(f"{k}: {stored.get(k)!r} (this run: {wanted.get(k)!r})" for k in differ[:4])

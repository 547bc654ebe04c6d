"""TEMPORARY adapter (helper `core`): calls the stage functions through their new signatures
(issue 11/13: `expect: Provenance`, `stage_errors`, `OutputOptions`) while this branch still has
the old ones. Delete once helper `merge`'s branch is merged, and call the functions directly."""

from __future__ import annotations

import inspect

from tasks.records import AudioFile, Batch, FileError, FolderReport, OutputOptions, Provenance, StageReport
from tasks.settings import PipelineSettings
from tasks.storage import Store


def _new(fn) -> bool:
    return "expect" in inspect.signature(fn).parameters


def transcribe_files(
    files: list[AudioFile], settings: PipelineSettings, store: Store, expect: Provenance, model: str | None, shard: int
) -> StageReport:
    from tasks import transcribe

    if _new(transcribe.transcribe_files):
        return transcribe.transcribe_files(files, settings, store, expect, shard)
    return transcribe.transcribe_files(files, settings, store, model, shard)


def tokenise_batches(
    batches: list[Batch], settings: PipelineSettings, store: Store, expect: Provenance, shard: int
) -> StageReport:
    from tasks import tokenise

    if _new(tokenise.tokenise_batches):
        return tokenise.tokenise_batches(batches, settings, store, expect, shard)
    return tokenise.tokenise_batches(batches, settings, store, shard)


def merge_folder(
    folder: str, files: list[AudioFile], store: Store, expect: Provenance, known_errors: list[FileError],
    stage_errors: dict[str, str], output: OutputOptions,
) -> FolderReport:
    from tasks import merge

    if _new(merge.merge_folder):
        return merge.merge_folder(folder, files, store, expect, known_errors, stage_errors, output)
    return merge.merge_folder(folder, [f.id for f in files], store, known_errors)

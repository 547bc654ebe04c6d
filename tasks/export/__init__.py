"""`audio-pipeline export`: a results root into lhotse, Hugging Face, WebDataset or NeMo form.

Every format shares the engine in `shards.py` (streaming, atomic shards, resumable) and the line
reader in `reader.py`; each module here knows one ecosystem's layout. The results root's
`manifest.json` supplies the audio root (ids are relative to it) and the token dtype, and is
copied into every export.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

from tasks.export.shards import ExportError, ExportReport, LineError, ShardLimit, parse_shard_size, run_export
from tasks.manifest import read_manifest
from tasks.settings import EXPORT_FORMATS

Format = Literal["lhotse", "hf", "webdataset", "nemo"]
FORMATS: tuple[str, ...] = EXPORT_FORMATS

__all__ = ["FORMATS", "ExportError", "ExportReport", "Format", "LineError", "ShardLimit", "export", "parse_shard_size"]


def export(
    results_root: str, fmt: str, out: str, *, shard_size: str | ShardLimit = "10000", with_audio: bool = False,
    shar: bool = False, audio_root: str | None = None, progress: Callable[[str], None] = lambda _: None,
) -> ExportReport:
    """Export every `{folder}.jsonl` line under `results_root` into `out` as `fmt`.

    Args:
        shard_size: samples per shard ("10000") or a byte bound ("500MB").
        with_audio: hf only: embed each file's bytes in an `audio` column.
        shar: lhotse only: write Lhotse Shar (cuts + FLAC tar) instead of jsonl.gz manifests.
        audio_root: where the audio lives, over the manifest's (audio moved, or no manifest).

    Raises:
        ExportError: an unknown format, no results, options that do not fit the format, or a
            format that needs the audio root when neither the manifest nor `audio_root` gives it.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    try:
        manifest = read_manifest(results_root)
    except ValueError as e:
        raise ExportError(str(e)) from e
    from tasks.storage import Store

    if not Store(results_root).folders_with_results():
        raise ExportError(f"no {{folder}}.jsonl under {results_root!r}: nothing to export")
    if with_audio and fmt != "hf":
        raise ExportError("--with-audio is for --format hf (webdataset always holds the audio; lhotse and nemo point at it)")
    if shar and fmt != "lhotse":
        raise ExportError("--shar is for --format lhotse")
    if audio_root and "://" not in audio_root:
        audio_root = os.path.abspath(audio_root)  # NeMo and lhotse need paths that work from anywhere
    root = audio_root or (manifest.audio_root if manifest else None)
    dtype = manifest.tokeniser.value_dtype if manifest else "int64"
    with_quality = bool(manifest and manifest.output.with_quality) or _first_line_has_quality(results_root)
    language = manifest.service.language if manifest else None
    if root is None and (fmt in ("lhotse", "nemo") or with_audio):
        raise ExportError(
            f"{results_root!r} has no manifest.json, and --format {fmt}{' --with-audio' if with_audio else ''} "
            "needs to know where the audio is: pass --audio-root"
        )
    limit = shard_size if isinstance(shard_size, ShardLimit) else parse_shard_size(shard_size)
    return run_export(results_root, out, _writer(fmt, root, dtype, with_audio, with_quality, shar, language),
                      limit, manifest, progress)


def _writer(fmt: str, root: str | None, dtype: str, with_audio: bool, with_quality: bool, shar: bool,
            language: str | None):
    if fmt == "lhotse":
        try:
            import lhotse  # noqa: F401
        except ImportError as e:
            raise ExportError("--format lhotse needs lhotse: pip install 'audio-pipeline[export]'") from e
        from tasks.export.lhotse import LhotseWriter

        return LhotseWriter(root, shar=shar, language=language)
    if fmt == "hf":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise ExportError("--format hf needs pyarrow: pip install 'audio-pipeline[export]'") from e
        from tasks.export.hf import HfWriter

        return HfWriter(value_dtype=dtype, with_audio=with_audio, with_quality=with_quality, audio_root=root)
    if fmt == "webdataset":
        from tasks.export.webdataset import WebDatasetWriter

        return WebDatasetWriter(root, value_dtype=dtype)
    from tasks.export.nemo import NemoWriter

    return NemoWriter(root)


def _first_line_has_quality(results_root: str) -> bool:
    from tasks.export.reader import Sample, iter_lines

    for line in iter_lines(results_root):
        return isinstance(line, Sample) and line.quality is not None
    return False

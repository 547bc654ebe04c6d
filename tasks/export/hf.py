"""Hugging Face `datasets`: Parquet shards `data/shard-NNNNNN.parquet` and a dataset card.

Columns: `id`, `transcription`, `token_array` (a list of the manifest's value dtype, e.g.
uint16), `audio` (`{bytes, path}`, the file as stored, with `with_audio`) and, when the lines
carry a `quality` object, one typed column per known quality field plus `quality` (the object as
JSON text, lossless). `load_dataset("parquet", data_files="OUT/data/*.parquet")` or
`load_dataset("OUT")` (the card's `configs` names the files); `cast_column("audio", Audio())`
decodes the audio. `source_id`, `start`, `end` (null for whole files) say where a long
recording's segment lies in its source; with `with_audio` its `audio` is just that span (FLAC).
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.audio_stream import span_file
from tasks.export.reader import Sample, audio_info, audio_size, flat_quality, read_audio
from tasks.export.shards import ExportReport, LineError
from tasks.storage import Store, stem_id
from whisper_service.audio import AudioDecodeError
from tasks.records import AudioQuality, TranscriptQuality

ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 32 << 20  # flush earlier when audio makes rows large: bounded memory


def quality_columns() -> dict[str, str]:
    """Known quality fields and their Arrow type name, from the records that define them."""
    columns: dict[str, str] = {"duration": "float64", "language": "string"}
    for model in (TranscriptQuality, AudioQuality):
        for name, field in model.model_fields.items():
            columns[name] = _arrow_type_name(field.annotation)
    return columns


def _arrow_type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else annotation
    if typing.get_origin(base) is list:
        return "list<string>"
    return {float: "float64", int: "int64", str: "string", bool: "bool"}.get(base, "string")


class HfWriter:
    name = "hf"

    def __init__(self, *, value_dtype: str = "int64", with_audio: bool = False, with_quality: bool = False,
                 audio_root: str | None = None) -> None:
        if with_audio and not audio_root:
            raise ValueError("with_audio needs the audio root (from the manifest or --audio-root)")
        self.value_dtype = value_dtype
        self.with_audio = with_audio
        self.with_quality = with_quality
        self.audio_root = (audio_root or "").rstrip("/")
        self._schema = None

    def options(self) -> dict:
        return {"dtype": self.value_dtype, "audio": self.with_audio, "quality": self.with_quality,
                "audio_root": self.audio_root if self.with_audio else None}

    def files(self, index: int) -> list[str]:
        return [f"data/shard-{index:06d}.parquet"]

    def size_of(self, sample: Sample) -> int:
        return len(sample.raw) + (self._audio_size(sample) if self.with_audio else 0)

    def shard_overhead(self) -> int:
        return 4096

    def hash_extra(self, sample: Sample) -> bytes:
        return str(self._audio_size(sample)).encode() if self.with_audio else b""

    def _audio_size(self, sample: Sample) -> int:
        try:
            if sample.segment is not None:  # its span as 16-bit FLAC: at most the PCM size
                info = audio_info(f"{self.audio_root}/{sample.audio_id}")
                return int(sample.segment.duration * info.sample_rate * info.channels * 2)
            return audio_size(f"{self.audio_root}/{sample.id}")
        except (OSError, RuntimeError):
            return 0  # missing: the writer reports it

    def schema(self):
        import pyarrow as pa

        if self._schema is None:
            types_ = {"float64": pa.float64(), "int64": pa.int64(), "string": pa.string(), "bool": pa.bool_(),
                      "list<string>": pa.list_(pa.string())}
            fields = [
                pa.field("id", pa.string(), nullable=False),
                pa.field("transcription", pa.string(), nullable=False),
                pa.field("token_array", pa.list_(pa.from_numpy_dtype(_numpy_dtype(self.value_dtype))), nullable=False),
                # A long recording's segment (issue 22): its source file and span; null for whole files.
                pa.field("source_id", pa.string()), pa.field("start", pa.float64()), pa.field("end", pa.float64()),
            ]
            if self.with_audio:
                fields.append(pa.field("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
            if self.with_quality:
                fields += [pa.field(name, types_[t]) for name, t in quality_columns().items()]
                fields.append(pa.field("quality", pa.string()))
            self._schema = pa.schema(fields)
        return self._schema

    def write_shard(self, index: int, samples: Iterator[Sample], targets: dict[str, str]) -> list[LineError]:
        import pyarrow.parquet as pq

        schema = self.schema()
        errors: list[LineError] = []
        rows: list[dict[str, Any]] = []
        buffered = 0
        with pq.ParquetWriter(targets[self.files(index)[0]], schema, compression="zstd") as writer:
            for sample in samples:
                row = self._row(sample, errors)
                if row is None:
                    continue
                rows.append(row)
                buffered += len(sample.raw) + (len(row["audio"]["bytes"]) if self.with_audio else 0)
                if len(rows) >= ROW_GROUP_ROWS or buffered >= ROW_GROUP_BYTES:
                    writer.write_table(self._table(rows))
                    rows, buffered = [], 0
            # A shard of failed lines only is a file with the schema and no row group: an empty
            # row group makes datasets fail ("BatchSize must be greater than 0").
            if rows:
                writer.write_table(self._table(rows))
        return errors

    def _row(self, sample: Sample, errors: list[LineError]) -> dict[str, Any] | None:
        row: dict[str, Any] = {"id": sample.id, "transcription": sample.transcription, "token_array": sample.token_array}
        span = sample.segment
        row.update(source_id=span and span.source_id, start=span and span.start, end=span and span.end)
        if self.with_audio:
            path = f"{self.audio_root}/{sample.audio_id}"
            try:
                data = read_audio(path) if span is None else span_file(path, span.start, span.end)[0]
                row["audio"] = {"bytes": data, "path": sample.id if span is None else f"{stem_id(sample.id)}.flac"}
            except (OSError, AudioDecodeError) as e:
                errors.append(LineError(id=sample.id, error=f"cannot read the audio {path}: {e}"))
                return None
        if self.with_quality:
            flat = flat_quality(sample.quality)
            for name, arrow_type in quality_columns().items():
                value = flat.get(name)
                row[name] = _coerce(value, arrow_type)
            row["quality"] = None if sample.quality is None else json.dumps(sample.quality, ensure_ascii=False)
        return row

    def _table(self, rows: list[dict[str, Any]]):
        import pyarrow as pa

        return pa.Table.from_pylist(rows, schema=self.schema())

    def finish(self, out: Path, report: ExportReport) -> None:
        """A dataset card whose `configs` lets `load_dataset(OUT)` find the shards."""
        card = (
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/shard-*.parquet\n"
            "---\n\n# audio-pipeline export\n\n"
            f"{report.samples} clips from an audio-pipeline results root. `manifest.json` says what\n"
            "`token_array` means (tokeniser, tokens per second, codebooks, layout) and how the text was made.\n"
        )
        Store(str(out)).write_bytes("README.md", card.encode())


def _coerce(value: Any, arrow_type: str) -> Any:
    """Values of the wrong JSON type become null rather than failing the shard; quality stays in `quality`."""
    if value is None:
        return None
    if arrow_type == "float64":
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if arrow_type == "int64":
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if arrow_type == "list<string>":
        return [str(v) for v in value] if isinstance(value, list) else None
    if arrow_type == "bool":
        return value if isinstance(value, bool) else None
    return str(value)


def _numpy_dtype(name: str):
    import numpy as np

    return np.dtype(name)

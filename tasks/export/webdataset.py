"""WebDataset: tar shards `shard-NNNNNN.tar` of bounded size, one group of members per sample.

Per sample, under the key `{folder}/{stem}` (dots turned into `_`: WebDataset splits the key
from the extension at the first dot): `KEY.flac` (the audio as stored, its own suffix; absent when
the file cannot be read), `KEY.txt` (the transcription), `KEY.tokens.npy` (token_array in the
manifest's value dtype) and `KEY.json` (id, folder, duration, sample rate, channels, token count,
quality). `webdataset.WebDataset("OUT/shard-{000000..00000N}.tar").decode()` reads it.

With a byte `shard_size`, `size_of` is an upper bound of a sample's tar members (headers and
512-byte padding included), so no shard passes the bound unless one sample alone does.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf

from tasks.audio_stream import span_file
from tasks.export.reader import Sample, audio_info, audio_size, quality_duration, read_audio
from tasks.storage import stem_id
from whisper_service.audio import AudioDecodeError
from tasks.export.shards import ExportReport, LineError

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a whole record
NPY_HEADER = 128  # numpy's .npy v1 header for a 1-D array


def sample_key(file_id: str) -> str:
    """`p225/p225_001_mic2.flac` -> `p225/p225_001_mic2`; dots -> `_` (WebDataset's key/extension split).

    A segment's key keeps its span: `book/ch01.flac#t=1.000,2.500` -> `book/ch01#t=1_000,2_500`.
    """
    return stem_id(file_id).replace(".", "_")


def _padded(n: int) -> int:
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


def _name_overhead(key: str) -> int:
    """A name tar's header cannot hold (non-ASCII, long) costs a PAX header per member."""
    name = f"{key}.tokens.npy"
    return 0 if name.isascii() and len(name) <= 100 else _padded(len(name.encode()) + 64)


class WebDatasetWriter:
    name = "webdataset"

    def __init__(self, audio_root: str | None, *, value_dtype: str = "int64") -> None:
        self.audio_root = (audio_root or "").rstrip("/")
        self.value_dtype = np.dtype(value_dtype)

    def options(self) -> dict:
        return {"audio_root": self.audio_root, "dtype": self.value_dtype.name}

    def files(self, index: int) -> list[str]:
        return [f"shard-{index:06d}.tar"]

    def _size(self, sample: Sample) -> int:
        if not self.audio_root:
            return 0
        try:
            if sample.segment is not None:  # its span as 16-bit FLAC: at most the PCM size, plus a header
                info = audio_info(f"{self.audio_root}/{sample.audio_id}")
                return int(sample.segment.duration * info.sample_rate * info.channels * 2) + 8192
            return audio_size(f"{self.audio_root}/{sample.id}")
        except (OSError, RuntimeError):
            return 0

    def size_of(self, sample: Sample) -> int:
        # The JSON metadata holds the line minus its tokens plus < 512 bytes of fields: below len(raw) + 512.
        return 4 * _name_overhead(sample_key(sample.id)) + (
            _padded(self._size(sample)) + _padded(len(sample.transcription.encode()))
            + _padded(NPY_HEADER + len(sample.token_array) * self.value_dtype.itemsize) + _padded(len(sample.raw) + 512)
        )

    def shard_overhead(self) -> int:
        return TAR_RECORD + 2 * TAR_BLOCK

    def hash_extra(self, sample: Sample) -> bytes:
        return str(self._size(sample)).encode()

    def write_shard(self, index: int, samples: Iterator[Sample], targets: dict[str, str]) -> list[LineError]:
        errors: list[LineError] = []
        keys: set[str] = set()  # per shard: bounded by the shard size
        with tarfile.open(targets[self.files(index)[0]], "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample_key(sample.id)
                if key in keys:  # "a.b.flac" and "a_b.flac": WebDataset would merge the two samples
                    errors.append(LineError(id=sample.id, error=f"its WebDataset key {key!r} is another id's in this shard"))
                    continue
                keys.add(key)
                for name, data in self._members(sample):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same input, same bytes
                    tar.addfile(info, io.BytesIO(data))
                # TarFile keeps every member's TarInfo for listing; a writer never lists: memory flat.
                tar.members.clear()
        return errors  # a sample without readable audio still has its text, tokens and metadata

    def _members(self, sample: Sample) -> list[tuple[str, bytes]]:
        key = sample_key(sample.id)
        meta: dict = {"id": sample.id, "folder": sample.folder, "n_tokens": len(sample.token_array)}
        if sample.segment is not None:  # where in which source (its audio member is just the span)
            meta.update(source_id=sample.segment.source_id, start=sample.segment.start, end=sample.segment.end)
        members: list[tuple[str, bytes]] = []
        audio = self._audio(sample, meta)
        if audio is not None:
            suffix = "flac" if sample.segment is not None else PurePosixPath(sample.id).suffix.lower().lstrip(".") or "audio"
            members.append((f"{key}.{suffix}", audio))
        if "duration" not in meta and (duration := quality_duration(sample.quality)) is not None:
            meta["duration"] = duration
        if sample.quality is not None:
            meta["quality"] = sample.quality
        tokens = io.BytesIO()
        np.save(tokens, np.asarray(sample.token_array, dtype=self.value_dtype), allow_pickle=False)
        members += [
            (f"{key}.txt", sample.transcription.encode()),
            (f"{key}.tokens.npy", tokens.getvalue()),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode()),
        ]
        return members

    def _audio(self, sample: Sample, meta: dict) -> bytes | None:
        if not self.audio_root:
            meta["audio_error"] = "no audio root (no manifest and no --audio-root)"
            return None
        path = f"{self.audio_root}/{sample.audio_id}"
        if sample.segment is not None:
            try:
                data, _ = span_file(path, sample.segment.start, sample.segment.end)
            except (AudioDecodeError, OSError) as e:
                meta["audio_error"] = f"cannot read {sample.segment.start}-{sample.segment.end} s of {path}: {e}"
                return None
        else:
            try:
                data = read_audio(path)
            except OSError as e:
                meta["audio_error"] = f"cannot read {path}: {e}"
                return None
        try:
            info = sf.info(io.BytesIO(data))
            meta.update(duration=info.frames / info.samplerate, sample_rate=info.samplerate, channels=info.channels)
        except RuntimeError as e:
            meta["audio_error"] = f"soundfile cannot read the header of {path}: {e}"
        return data

    def finish(self, out: Path, report: ExportReport) -> None:
        pass

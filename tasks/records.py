"""Every record that crosses a boundary: intermediates on storage, task results, JSONL lines.

Frozen pydantic models, one `id` each: the path relative to the audio root with `/`,
e.g. "p225/p225_001_mic2.flac". Task results stay small (ids, counts, errors), never audio.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Stage = Literal["discover", "decode", "transcribe", "tokenise", "merge"]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileError(Record):
    """Why one file has no line in its folder's JSONL; written to `{folder}.errors.jsonl`."""

    id: str
    stage: Stage
    error: str


class SourceInfo(Record):
    """What identifies one version of a source file: a changed file is redone, an unchanged one reused."""

    size: int
    mtime: str  # mtime, ETag or creation time as the filesystem reports it; compared, never parsed


class AudioFile(Record):
    id: str
    path: str  # full path/URL for the filesystem of the audio root
    source: SourceInfo

    @property
    def folder(self) -> str:
        return folder_of(self.id)


class Batch(Record):
    """Files of one folder processed together by one engine call."""

    folder: str
    files: list[AudioFile]


class Shard(Record):
    """The unit of one Prefect task: many batches, so task runs stay bounded as the corpus grows."""

    index: int
    batches: list[Batch]

    @property
    def n_files(self) -> int:
        return sum(len(b.files) for b in self.batches)

    @property
    def folders(self) -> list[str]:
        return sorted({b.folder for b in self.batches})


class Transcription(Record):
    """Intermediate at `transcriptions/{folder}/{stem}.json`: the text plus what produced it."""

    id: str
    text: str
    language: str
    duration: float
    model: str
    service_url: str
    source: SourceInfo


class Tokens(Record):
    """Intermediate at `tokens/{folder}/{stem}.json`: the tokens plus the tokeniser and its settings."""

    id: str
    token_array: list[int]
    tokenizer: str
    tokenizer_settings: dict[str, Any]
    source: SourceInfo


class Failure(Record):
    """Intermediate written in place of a result when a stage failed, so merge can say why.

    Never reused: a rerun tries the file again.
    """

    id: str
    stage: Stage
    error: str
    source: SourceInfo
    failed: Literal[True] = True


class OutputLine(Record):
    """One line of `{folder}.jsonl`: the product's contract."""

    id: str
    transcription: str
    token_array: list[int]


class StageReport(Record):
    """What one shard task did for one stage; small, so Prefect can persist it cheaply."""

    stage: Literal["transcribe", "tokenise"]
    shard: int
    files: int
    done: int = 0
    reused: int = 0
    failed: int = 0
    audio_seconds: float = 0.0


class FolderReport(Record):
    """What merge wrote for one folder."""

    folder: str
    files: int
    lines: int
    errors: list[FileError] = Field(default_factory=list)
    audio_seconds: float = 0.0
    changed: bool = True  # False: the stored JSONL already held exactly these lines
    jsonl: str
    errors_jsonl: str | None = None


class RunSummary(Record):
    folders: int
    files: int
    lines: int
    failed: int
    audio_hours: float
    wall_seconds: float
    files_per_second: float
    results_root: str
    errors: list[FileError] = Field(default_factory=list)
    stale_folders: list[str] = Field(
        default_factory=list, description="Folders with a JSONL in the results but no audio under the root any more."
    )


def folder_of(file_id: str) -> str:
    """`p225/p225_001_mic2.flac` -> `p225`; a file at the root belongs to folder `_root`."""
    head, _, _ = file_id.rpartition("/")
    return head or ROOT_FOLDER


ROOT_FOLDER = "_root"

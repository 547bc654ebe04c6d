"""Every record that crosses a boundary: intermediates on storage, task results, JSONL lines.

Frozen pydantic models, one `id` each: the path relative to the audio root with `/`,
e.g. "p225/p225_001_mic2.flac". Task results stay small (ids, counts, errors), never audio.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Stage = Literal["discover", "decode", "transcribe", "tokenise", "merge", "quality"]
QualityFlag = Literal["repetition", "low_confidence", "no_speech", "too_fast", "fallback_exhausted"]


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
    # Local: mtime in ns; object stores: `etag:{ETag}[@{version}]`; compared, never parsed (`tasks.discover`)
    mtime: str
    sha256: str | None = None  # the bytes' hash, only with `verify_content`


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


class TranscriptQuality(Record):
    """What the Whisper service says about one clip's text (see docs/QUALITY.md for units and ranges)."""

    language_probability: float | None = None  # multilingual models only
    avg_logprob: float | None = None  # of the kept decode; None for silence that never reached the model
    no_speech_prob: float | None = None
    compression_ratio: float | None = None  # gzip ratio of the text; > 2.4 smells of a repetition loop
    temperature: float | None = None  # the fallback temperature whose decode was kept
    words_per_second: float | None = None
    flags: list[QualityFlag] = Field(default_factory=list)


class AudioQuality(Record):
    """Measured on the audio where it is decoded for tokenising (no second decode)."""

    sample_rate: int  # of the file, before resampling
    channels: int
    rms_dbfs: float  # -inf for digital silence is stored as -120.0
    clipped_fraction: float  # samples at |x| >= 0.999 full scale, 0..1
    silence_fraction: float  # 20 ms frames below -60 dBFS, 0..1
    snr_db: float | None  # WADA-SNR estimate; None where undefined (silence)


class Provenance(Record):
    """What this run expects of an intermediate for it to count: anything else is redone, and at
    merge time it is a missing stage (reported), never joined into a line."""

    decode_fingerprint: str | None  # from the service's /healthz; None: the service named none, so nothing is reusable
    language: str | None  # the language this run requests (None: detect)
    tokenizer_settings: dict[str, Any]  # JSON round-tripped, as stored in Tokens.tokenizer_settings
    # This run's id (the flow run's): stamped on every intermediate the stages write, so merge
    # counts as `new` only what this run produced. Never part of a reuse check.
    run_id: str | None = None


class Transcription(Record):
    """Intermediate at `transcriptions/{folder}/{stem}.json`: the text plus what produced it."""

    id: str
    text: str
    language: str
    duration: float
    model: str
    service_url: str
    source: SourceInfo
    engine: str = ""  # "openai-whisper" | "faster-whisper"; "" in intermediates older than #12
    decode_fingerprint: str = ""  # the service's fingerprint of engine, weights hash and decode options
    requested_language: str | None = None  # what the run asked for (the `language` above is what came back)
    quality: TranscriptQuality | None = None
    run_id: str | None = None  # the run that produced it (`Provenance.run_id`); None before it existed


class Tokens(Record):
    """Intermediate at `tokens/{folder}/{stem}.json`: the tokens plus the tokeniser and its settings."""

    id: str
    token_array: list[int]
    tokenizer: str
    tokenizer_settings: dict[str, Any]
    source: SourceInfo
    audio: AudioQuality | None = None
    run_id: str | None = None  # the run that produced it (`Provenance.run_id`); None before it existed


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


class QualityOutputLine(OutputLine):
    """A line written with `--with-quality`: the contract's three fields plus a `quality` object."""

    quality: dict[str, Any]


class OutputOptions(Record):
    """How merge writes lines: the contract's three fields by default."""

    with_quality: bool = False  # add a `quality` object to each line
    drop_flagged: bool = False  # move flagged clips to `{folder}.errors.jsonl` with stage "quality"


class StageReport(Record):
    """What one shard task did for one stage; small, so Prefect can persist it cheaply."""

    stage: Literal["transcribe", "tokenise", "segment"]
    shard: int
    files: int
    done: int = 0
    reused: int = 0
    failed: int = 0
    audio_seconds: float = 0.0


class RemovedLine(Record):
    """An id the folder's last merge wrote (a line or an errors line) that this merge did not write, and why."""

    id: str
    reason: str


class FolderReport(Record):
    """What merge wrote for one folder."""

    folder: str
    files: int  # audio files (a long recording is one, however many segment lines it gives)
    lines: int  # JSONL lines, segments included
    errors: list[FileError] = Field(default_factory=list)
    audio_seconds: float = 0.0
    changed: bool = True  # False: the stored JSONL already held exactly these lines
    jsonl: str
    errors_jsonl: str | None = None
    new: int = 0  # files with a line whose intermediate this run produced (`run_id`), none failed
    flagged: int = 0  # lines whose transcription carries quality flags
    worst: list[dict[str, Any]] = Field(default_factory=list)  # a few flagged clips: id, flags, text
    removed: int = 0  # ids the last merge wrote that this one did not (`tasks.merge`: why, per id)
    removed_ids: list[RemovedLine] = Field(default_factory=list)  # the first few of them
    kept: int = 0  # lines of files this run did not list but that are still on the audio root, kept
    segments: int = 0  # lines that are segments of long recordings (issue 22)
    segment_seconds: float = 0.0  # their audio, in all
    segment_durations: list[float] = Field(default_factory=list)  # the first SEGMENT_SAMPLE of them, for a histogram


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
    new: int = 0  # files this run transcribed or tokenised (not reused)
    flagged: int = 0
    exports: dict[str, str] = Field(default_factory=dict)  # format -> the directory this run exported it to
    export_errors: list[str] = Field(default_factory=list)  # one line per export that failed or left lines out
    removed: int = 0  # ids whose line (or errors line) this run's merges removed, with why below
    removed_ids: list[RemovedLine] = Field(default_factory=list)  # the first few, with why
    kept: int = 0  # lines kept for files this run did not list (still on the audio root, still valid)
    refused_errors: str | None = None  # where the files refused at discovery are listed (`_refused.errors.jsonl`)


class Segment(Record):
    """One speech segment of a long recording: seconds in the source, rounded to ms (issue 22).

    Its JSONL line id is the W3C media-fragment form of the span (`segment_id`).
    """

    start: float
    end: float

    @property
    def duration(self) -> float:
        return round(self.end - self.start, 3)

    def line_id(self, source_id: str) -> str:
        return segment_id(source_id, self.start, self.end)


class SegmentList(Record):
    """Intermediate at `segments/{folder}/{stem}.json`: where one long file was cut, and by what."""

    id: str  # the source file's id
    source: SourceInfo
    fingerprint: str  # sha256 of the VAD model + cutting options (`tasks.segments.segmentation_fingerprint`)
    duration: float  # of the source, seconds
    segments: list[Segment]
    run_id: str | None = None


def segment_id(source_id: str, start: float, end: float) -> str:
    """`book/ch01.flac#t=12.340,27.100`: a segment's line id (W3C Media Fragments, temporal, NPT seconds)."""
    return f"{source_id}#t={start:.3f},{end:.3f}"


def split_segment_id(line_id: str) -> tuple[str, float, float] | None:
    """`segment_id` inverted: (source id, start, end), or None for a whole file's id."""
    source, sep, fragment = line_id.rpartition("#t=")
    if not sep or not source:
        return None
    start, comma, end = fragment.partition(",")
    try:
        return (source, float(start), float(end)) if comma else None
    except ValueError:
        return None


def line_order(line_id: str) -> tuple[str, float, float]:
    """Sort key of JSONL lines: by source id, then start (a whole file's line keys as its id)."""
    parts = split_segment_id(line_id)
    return parts if parts is not None else (line_id, -1.0, -1.0)


class SegmentOutputLine(OutputLine):
    """A segment's line: the contract's three fields plus where in which source it lies."""

    source_id: str
    start: float
    end: float


class QualitySegmentOutputLine(SegmentOutputLine):
    quality: dict[str, Any]


SEGMENT_SAMPLE = 500  # segment durations a FolderReport keeps (bounded: Prefect persists reports)


def folder_of(file_id: str) -> str:
    """`p225/p225_001_mic2.flac` -> `p225`; a file at the root belongs to folder `_root`."""
    head, _, _ = file_id.rpartition("/")
    return head or ROOT_FOLDER


ROOT_FOLDER = "_root"


def source_id(line_id: str) -> str:
    """The audio file a JSONL line's id belongs to: the id itself, or for a long recording's
    segment (`book/ch01.flac#t=12.340,27.100`) its source (`split_segment_id`)."""
    parts = split_segment_id(line_id)
    return parts[0] if parts is not None else line_id

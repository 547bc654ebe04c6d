"""NeMo ASR/TTS manifests: one JSON object per line with `audio_filepath`, `duration`, `text`.

Shards are `manifest_000000.json`, ...; NeMo takes them as a list or as the brace pattern
`manifest__OP_000000..00000N_CL_.json`. `duration` comes from the audio header (soundfile), or
from the line's quality fields when the header cannot be read; a line with neither is an error.
A segment of a long recording points at its source file with `offset` and `duration` (seconds),
which NeMo's audio datasets read as that span.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from tasks.export.reader import Sample, audio_info, quality_duration
from tasks.export.shards import ExportReport, LineError


class NemoWriter:
    name = "nemo"

    def __init__(self, audio_root: str) -> None:
        self.audio_root = audio_root.rstrip("/")

    def options(self) -> dict:
        return {"audio_root": self.audio_root}

    def files(self, index: int) -> list[str]:
        return [f"manifest_{index:06d}.json"]

    def size_of(self, sample: Sample) -> int:
        return len(sample.transcription.encode()) + len(self.audio_root) + len(sample.id) + 96

    def shard_overhead(self) -> int:
        return 0

    def hash_extra(self, sample: Sample) -> bytes:
        return b""

    def write_shard(self, index: int, samples: Iterator[Sample], targets: dict[str, str]) -> list[LineError]:
        errors: list[LineError] = []
        with open(targets[self.files(index)[0]], "w", encoding="utf-8") as f:
            for sample in samples:
                path = f"{self.audio_root}/{sample.audio_id}"
                if sample.segment is not None:  # a long recording's segment: NeMo reads [offset, offset + duration)
                    line = {"audio_filepath": path, "offset": sample.segment.start, "duration": sample.segment.duration,
                            "text": sample.transcription, "id": sample.id}
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")
                    continue
                duration = _duration(path, sample)
                if isinstance(duration, str):
                    errors.append(LineError(id=sample.id, error=duration))
                    continue
                line = {"audio_filepath": path, "duration": duration, "text": sample.transcription, "id": sample.id}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        return errors

    def finish(self, out: Path, report: ExportReport) -> None:
        pass


def _duration(path: str, sample: Sample) -> float | str:
    """Seconds from the header, else from the quality fields; a string says why neither worked."""
    try:
        return round(audio_info(path).duration, 6)
    except (OSError, RuntimeError) as e:
        fallback = quality_duration(sample.quality)
        if fallback is not None:
            return fallback
        return f"no duration: cannot read the audio header of {path} ({e}) and the line has no quality duration"

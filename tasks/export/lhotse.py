"""lhotse manifests: recordings, supervisions (with the transcription) and cuts carrying the tokens.

Per shard `recordings.NNNNNN.jsonl.gz`, `supervisions.NNNNNN.jsonl.gz`, `cuts.NNNNNN.jsonl.gz`;
`CutSet.from_files(sorted(glob("cuts.*.jsonl.gz")))` reads them lazily. Each cut's `custom`
holds `token_array` (and `quality` when the lines have it), so `cut.token_array` works; the
recording points at the original audio file (a local path or URL under the manifest's audio
root), so nothing is copied. With `shar=True` the shards are Lhotse Shar instead
(`shar/cuts.NNNNNN.jsonl.gz` + `shar/recording.NNNNNN.tar` with the audio as FLAC), for
sequential reading from object storage: `CutSet.from_shar(in_dir=OUT/shar)`.

Ids: recording, supervision and cut ids are the line ids ("p225/p225_001_mic2.flac"); the
speaker is the folder (VCTK layout). A long recording's segments (issue 22) share one Recording,
the source file (id: its source id, written once per shard); each segment is a cut of it with
`start`/`duration`, whose supervision (id: the segment's line id) the supervisions manifest gives
with its start in the recording.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.export.reader import Sample, audio_info
from tasks.export.shards import ExportReport, LineError


class LhotseWriter:
    name = "lhotse"

    def __init__(self, audio_root: str, *, shar: bool = False, language: str | None = None) -> None:
        self.audio_root = audio_root.rstrip("/")
        self.shar = shar
        self.language = language

    def options(self) -> dict:
        return {"audio_root": self.audio_root, "shar": self.shar, "language": self.language}

    def files(self, index: int) -> list[str]:
        if self.shar:
            return [f"shar/cuts.{index:06d}.jsonl.gz", f"shar/recording.{index:06d}.tar"]
        return [f"{kind}.{index:06d}.jsonl.gz" for kind in ("recordings", "supervisions", "cuts")]

    def size_of(self, sample: Sample) -> int:
        return 3 * len(sample.raw) + 1024  # uncompressed JSON: the line's text and tokens, plus lhotse's fields

    def shard_overhead(self) -> int:
        return 0

    def hash_extra(self, sample: Sample) -> bytes:
        return b""

    def write_shard(self, index: int, samples: Iterator[Sample], targets: dict[str, str]) -> list[LineError]:
        cuts, errors = self._cuts(samples)
        if self.shar:
            return self._write_shar(index, cuts, targets) + errors
        recordings, supervisions, cut_files = (targets[f] for f in self.files(index))
        # compresslevel 6: within a few % of 9's size at about twice the speed.
        with (
            gzip.open(recordings, "wt", encoding="utf-8", compresslevel=6) as r,
            gzip.open(supervisions, "wt", encoding="utf-8", compresslevel=6) as s,
            gzip.open(cut_files, "wt", encoding="utf-8", compresslevel=6) as c,
        ):
            last_recording = None
            for cut in cuts:
                # One to_dict per cut, its parts reused, and the tokens attached after: lhotse's
                # to_dict deep-copies `custom` value by value (3/4 of the time on 10k lines).
                custom, cut.custom = cut.custom, None
                record = cut.to_dict()
                if record["recording"]["id"] != last_recording:  # segments of one source share it
                    r.write(json.dumps(record["recording"], ensure_ascii=False) + "\n")
                    last_recording = record["recording"]["id"]
                for supervision in record["supervisions"]:
                    if cut.start:  # a segment's cut: the manifest gives its start in the recording
                        supervision = {**supervision, "start": round(supervision["start"] + cut.start, 6)}
                    s.write(json.dumps(supervision, ensure_ascii=False) + "\n")
                record["custom"] = custom
                c.write(json.dumps(record, ensure_ascii=False) + "\n")
        return errors

    def _cuts(self, samples: Iterator[Sample]) -> tuple[Iterator, list[LineError]]:
        """Cuts built lazily (one at a time) and the errors of lines that have none."""
        from lhotse import AudioSource, Recording, SupervisionSegment

        errors: list[LineError] = []

        def build() -> Iterator:
            for sample in samples:
                path = f"{self.audio_root}/{sample.audio_id}"
                try:
                    info = audio_info(path)
                except (OSError, RuntimeError) as e:
                    errors.append(LineError(id=sample.id, error=f"cannot read the audio header of {path}: {e}"))
                    continue
                channels = list(range(info.channels))
                source = AudioSource(type="url" if "://" in path else "file", channels=channels, source=path)
                recording = Recording(
                    id=sample.audio_id, sources=[source], sampling_rate=info.sample_rate,
                    num_samples=info.num_samples, duration=info.duration,
                )
                cut = recording.to_cut()
                span = sample.segment
                start, duration = (0.0, info.duration) if span is None else (span.start, span.duration)
                cut.supervisions = [SupervisionSegment(
                    id=sample.id, recording_id=sample.audio_id, start=start, duration=duration,
                    channel=channels[0] if len(channels) == 1 else channels, text=sample.transcription,
                    speaker=sample.folder, language=self.language,
                )]
                if span is not None:  # the segment's cut: its span of the source, supervision relative to it
                    cut = cut.truncate(offset=span.start, duration=span.duration, preserve_id=True)
                    cut.id = sample.id
                cut.custom = {"token_array": sample.token_array}
                if sample.quality is not None:
                    cut.custom["quality"] = sample.quality
                yield cut

        return build(), errors

    def _write_shar(self, index: int, cuts: Iterator, targets: dict[str, str]) -> list[LineError]:
        """lhotse's own SharWriter, one shard at a time in a scratch dir, then moved to the temps."""
        from lhotse.audio.utils import AudioLoadingError
        from lhotse.shar import SharWriter

        errors: list[LineError] = []
        written = 0
        cut_target, tar_target = (targets[f] for f in self.files(index))
        with tempfile.TemporaryDirectory(dir=os.path.dirname(cut_target)) as scratch:
            # shard_size=None: one file per field, however many cuts; our engine does the sharding.
            with SharWriter(scratch, fields={"recording": "flac"}, shard_size=None) as writer:
                for cut in cuts:
                    # The audio is loaded before anything of the cut is written, so a failure
                    # leaves no trace in the shard. AudioLoadingError (a truncated FLAC whose
                    # header reads) subclasses only Exception.
                    try:
                        writer.write(cut)
                    except (AudioLoadingError, OSError, RuntimeError, ValueError) as e:
                        errors.append(LineError(id=cut.id, error=f"lhotse could not load the audio: {e}"))
                        continue
                    written += 1
            if written:
                os.replace(writer.output_paths["cuts"][0], cut_target)
                os.replace(writer.output_paths["recording"][0], tar_target)
            else:
                # SharWriter opens its files on the first cut: with none, write what it would
                # have for zero cuts (an empty gzip, an empty tar), so the shard is complete and
                # `CutSet.from_shar` reads it as no cuts.
                _empty_shar(cut_target, tar_target)
        return errors

    def finish(self, out: Path, report: ExportReport) -> None:
        pass


def _empty_shar(cut_target: str, tar_target: str) -> None:
    with gzip.open(cut_target, "wb"):
        pass
    with tarfile.open(tar_target, "w"):
        pass

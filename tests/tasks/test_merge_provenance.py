"""Merge trusts nothing it did not check; one errors line per failed file; quality in the output.

Real FLAC files through the plain stage functions and merge, as the flow calls them; the service
is a loopback server speaking the service's contract (tests.tasks.contract_service).
"""

from __future__ import annotations

import json
import shutil

from tasks.discover import list_audio, make_batches
from tasks.merge import merge_folder
from tasks.records import AudioFile, FileError, OutputOptions, SourceInfo, Tokens, Transcription
from tasks.storage import Store, output_name_problem
from tasks.tokenise import tokenise_batches
from tasks.transcribe import transcribe_files
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import expect_for, make_corpus, read_jsonl, run_steps, settings_for, write_clip


def errors_file(store: Store, folder: str) -> list[FileError]:
    return [FileError.model_validate(e) for e in read_jsonl(store, f"{folder}.errors.jsonl")]


def test_replaced_audio_and_a_tokenise_stage_that_fails_outright_gives_no_stale_line(tmp_path):
    """Regression (issue 13 item 1): after the audio was replaced, a rerun whose tokenise task
    failed outright (`encodec` without weights) wrote the new text with the old audio's tokens,
    reported 0 failed and exited 0."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3})
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        first = run_steps(settings, store, expect)
        assert first.folders["p1"].lines == 3
        old = {line["id"]: line for line in read_jsonl(store, "p1.jsonl")}

        write_clip(audio / "p1" / "p1_001.flac", 777, seconds=0.7)  # the audio replaced
        broken = settings.model_copy(update={"tokenizer": "encodec", "tokenizer_options": {}})
        expect_again = expect_for(settings)  # what the flow expected of the tokens it asked for
        again = run_steps(broken, store, expect_again)

    assert "tokenise" in again.stage_errors and "weights_path" in again.stage_errors["tokenise"]
    report = again.folders["p1"]
    lines = {line["id"]: line for line in read_jsonl(store, "p1.jsonl")}
    assert sorted(lines) == ["p1/p1_000.flac", "p1/p1_002.flac"]  # unchanged files: still valid
    assert lines["p1/p1_000.flac"] == old["p1/p1_000.flac"]
    assert all(line["token_array"] != old["p1/p1_001.flac"]["token_array"] for line in lines.values())
    errors = errors_file(store, "p1")
    assert [(e.id, e.stage) for e in errors] == [("p1/p1_001.flac", "tokenise")]
    assert errors[0].error.startswith("the tokenise task failed: ValueError: the encodec tokeniser needs weights_path")
    assert "stale tokens of an older version of the file" in errors[0].error
    # Counts match the errors file.
    assert report.errors == errors and report.lines == 2 and report.files == 3 and report.new == 0


def test_tokens_from_another_tokeniser_are_never_joined(tmp_path):
    """The same, with the audio unchanged: the stored tokens come from the old tokeniser's
    settings, this run asked for another one, and its task failed: no line joins them."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2})
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        run_steps(settings, store, expect_for(settings))
        broken = settings.model_copy(update={"tokenizer": "encodec", "tokenizer_options": {}})
        wanted = {"name": "encodec", "version": 1, "bandwidth": 6.0}
        again = run_steps(broken, store, expect_for(settings, tokenizer_settings=wanted))
    assert read_jsonl(store, "p1.jsonl") == []
    errors = errors_file(store, "p1")
    assert len(errors) == 2 == len(again.folders["p1"].errors)
    assert all("stale tokens from tokeniser settings name: 'simulated' (this run: 'encodec')" in e.error
               for e in errors), errors


def test_a_transcription_from_another_model_is_missing_with_a_precise_reason(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2})
    with ContractService(engine="openai-whisper", fingerprint="aaaa1111bbbb2222") as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
    files = [AudioFile(id=f"p1/p1_00{i}.flac", path="", source=_source(audio / "p1" / f"p1_00{i}.flac"))
             for i in range(2)]
    expect = expect.model_copy(update={"decode_fingerprint": "cccc3333dddd4444"})
    # The transcribe task of the new run never finished and nobody said why.
    report = merge_folder("p1", files, store, expect)
    assert report.lines == 0
    assert report.errors[0].stage == "transcribe" and report.errors[0].error == (
        "no transcribe result for this run: stale transcription from openai-whisper tiny.en "
        "(decode fingerprint aaaa1111bbbb, this run's is cccc3333dddd)"
    )
    # With the task's exception text, that is the reason given.
    report = merge_folder("p1", files, store, expect, stage_errors={"transcribe": "ServiceError: boom"})
    assert report.errors[0].error.startswith("the transcribe task failed: ServiceError: boom (stale transcription")
    # Nothing stored at all, no reason known: the task did not finish.
    report = merge_folder("p1", [*files, AudioFile(id="p1/none.flac", path="", source=SourceInfo(size=1, mtime="1"))],
                          store, expect)
    missing = next(e for e in report.errors if e.id == "p1/none.flac")
    assert missing.error.startswith("transcribe: no transcribe result for this run: the task did not finish")
    assert "; tokenise: no tokenise result for this run: the task did not finish" in missing.error


def test_a_file_failing_both_stages_is_one_errors_line_naming_both(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 1})
    (audio / "p1" / "p1_bad.flac").write_bytes(b"not audio at all")
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        run = run_steps(settings, store, expect_for(settings))
    errors = errors_file(store, "p1")
    assert [(e.id, e.stage) for e in errors] == [("p1/p1_bad.flac", "decode")]
    assert errors[0].error.startswith("transcribe: not readable audio; tokenise: not readable audio: ")
    assert run.folders["p1"].errors == errors and run.folders["p1"].lines == 1


def test_errors_files_cannot_collide_with_a_folders_jsonl(tmp_path):
    """Regression (issue 13 item 9): folder `x.errors` wrote `x.errors.jsonl`, folder `x`'s errors
    file. Discovery refuses such a folder (its files are reported in the run's refused list), and
    merge refuses it too if asked directly, so `x.errors.jsonl` only ever holds folder x's errors."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"x": 1, "x.errors": 2})
    (audio / "x" / "broken.flac").write_bytes(b"not audio")
    assert output_name_problem("x.errors") and output_name_problem("a/b.errors")
    assert output_name_problem("x") is None and output_name_problem("x.errors/y") is None
    with ContractService() as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run = run_steps(settings, store, expect)
        assert "x.errors" not in run.folders  # refused at discovery: no stage, no merge wrote for it
        clip = audio / "x.errors" / "x.errors_000.flac"
        by_hand = AudioFile(id="x.errors/x.errors_000.flac", path=str(clip),
                            source=SourceInfo(size=clip.stat().st_size, mtime=str(clip.stat().st_mtime)))
        direct = merge_folder("x.errors", [by_hand], store, expect)
    assert [e.id for e in errors_file(store, "x")] == ["x/broken.flac"]
    assert len(read_jsonl(store, "x.jsonl")) == 1
    assert direct.lines == 0 and "rename the folder" in direct.errors[0].error
    # x.errors.errors.jsonl: no folder's JSONL can be named so (its folder would end in .errors)
    assert sorted(p.name for p in (tmp_path / "results").glob("*.jsonl")) == [
        "x.errors.errors.jsonl", "x.errors.jsonl", "x.jsonl"]
    assert [e.id for e in errors_file(store, "x")] == ["x/broken.flac"]  # untouched by the direct call


def test_quality_fields_are_kept_and_lines_keep_the_contract_by_default(tmp_path):
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3})
    with ContractService(flags={"p1_002.flac": ["repetition", "low_confidence"]}) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run = run_steps(settings, store, expect)
        t = store.read_transcription("p1/p1_002.flac")
        k = store.read_tokens("p1/p1_002.flac")
        assert isinstance(t, Transcription) and isinstance(k, Tokens)
        assert (t.engine, t.decode_fingerprint, t.requested_language) == ("openai-whisper", "fp-openai-1", None)
        assert t.quality.flags == ["repetition", "low_confidence"] and t.quality.compression_ratio == 3.1
        assert k.audio.sample_rate == 16_000 and k.audio.channels == 1 and -20 < k.audio.rms_dbfs < 0
        report = run.folders["p1"]
        assert report.flagged == 1 and report.new == 3
        assert report.worst == [{"id": "p1/p1_002.flac", "flags": ["repetition", "low_confidence"], "text": t.text,
                                 "compression_ratio": 3.1, "avg_logprob": -1.4}]  # the UI ranks without reads
        lines = read_jsonl(store, "p1.jsonl")
        assert len(lines) == 3 and all(set(line) == {"id", "transcription", "token_array"} for line in lines)

        with_quality = run_steps(settings, store, expect, OutputOptions(with_quality=True))
        lines = {line["id"]: line for line in read_jsonl(store, "p1.jsonl")}
        quality = lines["p1/p1_002.flac"]["quality"]
        assert quality["flags"] == ["repetition", "low_confidence"] and quality["duration"] == t.duration
        assert {"avg_logprob", "compression_ratio", "no_speech_prob", "sample_rate", "channels", "rms_dbfs",
                "clipped_fraction", "silence_fraction", "snr_db", "language"} <= set(quality)
        assert with_quality.folders["p1"].new == 0  # reused: the index holds what the line needs

        dropped = run_steps(settings, store, expect, OutputOptions(drop_flagged=True))
    assert [line["id"] for line in read_jsonl(store, "p1.jsonl")] == ["p1/p1_000.flac", "p1/p1_001.flac"]
    errors = errors_file(store, "p1")
    assert [(e.id, e.stage) for e in errors] == [("p1/p1_002.flac", "quality")]
    assert errors[0].error.startswith("quality flags: repetition, low_confidence")
    assert dropped.folders["p1"].errors == errors and dropped.folders["p1"].flagged == 1


def test_an_older_service_without_quality_fields_or_fingerprint(tmp_path):
    """quality None, and no model identity: nothing is reused, yet this run's own text is joined."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 2})
    with ContractService(fingerprint=None, legacy=True) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        assert expect.decode_fingerprint is None
        run_steps(settings, store, expect)
        again = run_steps(settings, store, expect)
        assert len(service.requests) == 4 and again.stage("transcribe").reused == 0
    t = store.read_transcription("p1/p1_000.flac")
    assert t.quality is None and t.decode_fingerprint == "" and t.engine == ""
    assert again.folders["p1"].lines == 2 and again.folders["p1"].new == 2
    lines = read_jsonl(store, "p1.jsonl")
    assert json.loads(json.dumps(lines))[0]["transcription"] == t.text


def _source(path) -> SourceInfo:
    from tasks.discover import list_audio

    files, _ = list_audio(str(path.parent), (".flac",))
    return next(f.source for f in files if f.id == path.name)


def test_new_counts_only_what_this_run_produced(tmp_path):
    """Review finding 4: `new` counted every record read from an intermediate rather than the
    index: the results of an interrupted run, every file when the index was missing, and flagged
    clips that --drop-flagged moved to the errors (so they were both new and failed)."""
    audio = tmp_path / "audio"
    make_corpus(audio, {"p1": 3})
    with ContractService(flags={"p1_002.flac": ["repetition"]}) as service:
        settings = settings_for(audio, str(tmp_path / "results"), service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        # A run killed after its stages, before any merge: its intermediates are all there.
        files, _ = list_audio(settings.audio_root, settings.extensions)
        killed = expect.model_copy(update={"run_id": "killed-run"})
        transcribe_files(files, settings, store, killed)
        tokenise_batches(make_batches(files, 4), settings, store, killed)
        assert store.read_tokens("p1/p1_000.flac").run_id == "killed-run"
        sent = len(service.requests)

        resumed = run_steps(settings, store, expect)  # nothing redone: nothing new
        assert len(service.requests) == sent and resumed.folders["p1"].lines == 3
        assert resumed.folders["p1"].new == 0

        write_clip(audio / "p1" / "p1_003.flac", 31)
        shutil.rmtree(tmp_path / "results" / ".index")  # as after an upgrade: no index at all
        grown = run_steps(settings, store, expect, OutputOptions(drop_flagged=True))
        report = grown.folders["p1"]
        assert report.new == 1 and report.lines == 3 and report.flagged == 1
        assert [(e.id, e.stage) for e in report.errors] == [("p1/p1_002.flac", "quality")]

        write_clip(audio / "p1" / "p1_002.flac", 32)  # the flagged clip redone, dropped again
        redone = run_steps(settings, store, expect, OutputOptions(drop_flagged=True)).folders["p1"]
        assert redone.new == 0 and redone.lines == 3 and [e.id for e in redone.errors] == ["p1/p1_002.flac"]

"""Which roots a run may touch: `tasks.access.check_roots_allowed` against the allow-list."""

from __future__ import annotations

import os

import pytest

from tasks.access import RootNotAllowedError, check_roots_allowed
from tasks.settings import PipelineSettings


def settings(audio: str, results: str, allowed: str | None) -> PipelineSettings:
    extra = {} if allowed is None else {"allowed_roots": allowed}
    return PipelineSettings(audio_root=audio, results_root=results, **extra)


def test_no_allow_list_allows_everything(tmp_path):
    check_roots_allowed(settings("/etc", "/tmp/anything", None))


def test_roots_inside_the_allowed_ones_pass(tmp_path):
    (tmp_path / "data" / "audio").mkdir(parents=True)
    check_roots_allowed(settings(str(tmp_path / "data" / "audio"), str(tmp_path / "out" / "r"),
                                 f"{tmp_path}/data, {tmp_path}/out/"))
    check_roots_allowed(settings("s3://bucket/corpus/a", "s3://bucket/results", "s3://bucket"))


@pytest.mark.parametrize("audio, reason", [
    ("{t}/elsewhere", "audio root"),
    ("{t}/data/../elsewhere", "audio root"),  # `..` is resolved before comparing
    ("{t}/data-evil", "audio root"),  # a sibling sharing the prefix is not inside
    ("{t}/data/link", "audio root"),  # a symlink inside that points outside
    ("s3://bucket-other/a", "audio root"),
])
def test_roots_outside_are_refused_with_the_root_named(tmp_path, audio, reason):
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "link")
    audio = audio.format(t=tmp_path)
    with pytest.raises(RootNotAllowedError, match=f"{reason} '{audio}' is outside the allowed roots"):
        check_roots_allowed(settings(audio, f"{tmp_path}/data/results", f"{tmp_path}/data,s3://bucket"))


def test_the_results_root_is_checked_too(tmp_path):
    with pytest.raises(RootNotAllowedError, match="results root"):
        check_roots_allowed(settings(str(tmp_path / "a"), "/var/tmp/results", str(tmp_path)))


def test_the_allow_list_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIO_PIPELINE_ALLOWED_ROOTS", f"{tmp_path}/a,{tmp_path}/r")
    check_roots_allowed(PipelineSettings(audio_root=str(tmp_path / "a"), results_root=str(tmp_path / "r")))
    with pytest.raises(RootNotAllowedError):
        check_roots_allowed(PipelineSettings(audio_root=str(tmp_path / "b"), results_root=str(tmp_path / "r")))

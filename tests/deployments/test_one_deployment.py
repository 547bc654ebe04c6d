"""One deployment for many audio roots: the results-root rule, and a refusal as one Failed state.

Fast and in-process (the flow under Prefect's test harness); the same behaviour through a real
server, worker and trigger is in test_deployment.py.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from prefect.client.orchestration import get_client

from flows.demo import free_port
from flows.pipeline import parallel_transcribe_tokenise
from tasks.preflight import RunNotStartedError, check_roots, in_parameter_terms, settings_or_error
from tasks.settings import PipelineSettings, results_root_for

def tags_of(state) -> list[str]:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).tags


NAME = re.compile(r"^[A-Za-z0-9._-]+-[0-9a-f]{12}$")


def test_the_results_root_follows_from_the_audio_root(tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIO_PIPELINE_RESULTS_ROOT", raising=False)
    monkeypatch.delenv("AUDIO_PIPELINE_RESULTS_BASE", raising=False)
    base = str(tmp_path / "by-root")
    a, b = tmp_path / "site1" / "audio", tmp_path / "site2" / "audio"  # the same name, two roots
    for root in (a, b):
        root.mkdir(parents=True)
    (tmp_path / "link").symlink_to(a)
    ra, rb = results_root_for(str(a), base), results_root_for(str(b), base)
    assert ra != rb
    assert os.path.dirname(ra) == base and NAME.match(os.path.basename(ra))
    assert os.path.basename(ra).startswith("site1-audio-") and os.path.basename(rb).startswith("site2-audio-")
    # One owner, one folder: the spellings the owner check takes for one root give one folder.
    for spelling in (f"{a}/", str(tmp_path / "link"), str(tmp_path / "site1" / ".." / "site1" / "audio")):
        assert results_root_for(spelling, base) == ra, spelling
    # Odd names stay one safe path segment; URLs work too.
    odd = results_root_for("/data/../srv/über audio;rm -rf", base)
    assert "/" not in os.path.basename(odd) and NAME.match(os.path.basename(odd)), odd
    assert results_root_for("s3://bucket/corpus", "s3://out").startswith("s3://out/bucket-corpus-")
    # Settings: the rule only when no results root is given; the CLI's default stays `results`.
    assert PipelineSettings(audio_root=str(a)).results_root == "results"
    assert PipelineSettings(audio_root=str(a), results_base=base).results_root == ra
    assert PipelineSettings(audio_root=str(a), results_base=base, results_root="mine").results_root == "mine"
    monkeypatch.setenv("AUDIO_PIPELINE_RESULTS_BASE", base)
    assert PipelineSettings(audio_root=str(b)).results_root == rb
    monkeypatch.setenv("AUDIO_PIPELINE_RESULTS_ROOT", "explicit")
    assert PipelineSettings(audio_root=str(b)).results_root == "explicit"


def test_a_results_root_inside_another_is_refused(tmp_path):
    (tmp_path / "audio" / "p1").mkdir(parents=True)
    outer = tmp_path / "results"
    outer.mkdir()
    (outer / "_owner.json").write_text(json.dumps({"audio_root": "/elsewhere"}))
    settings = settings_or_error(audio_root=str(tmp_path / "audio"), results_base=str(outer))
    with pytest.raises(RunNotStartedError, match="lies inside .*results root of another run"):
        check_roots(settings)
    assert not any(p.name != "_owner.json" for p in outer.iterdir())  # nothing created


def test_hints_name_the_parameter_in_a_flow_run():
    message = ("results root 'results' holds the results of audio root '/a', not '/b'; use another --results, "
               "or delete results/_owner.json (and the old results) to reuse it")
    assert "use another results_root, or" in in_parameter_terms(message)
    assert in_parameter_terms("or pass --service-url.") == "or pass service_url."
    assert in_parameter_terms("audio root '/x--results' is gone") == "audio root '/x--results' is gone"


@pytest.mark.slow
def test_a_run_that_cannot_start_ends_failed_with_its_reason(prefect_harness, tmp_path, monkeypatch):
    audio = tmp_path / "audio"
    (audio / "p1").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.setenv("AUDIO_PIPELINE_ALLOWED_ROOTS", str(audio))
    state = parallel_transcribe_tokenise(audio_root=str(outside), results_base=str(audio / "r"), return_state=True)
    assert state.is_failed() and state.name == "Failed", state
    assert state.message.startswith(f"audio root {str(outside)!r} is outside the allowed roots"), state.message
    assert "\n" not in state.message
    assert "refused" in tags_of(state)  # the watcher does not announce this root's files again
    with pytest.raises(RunNotStartedError, match="outside the allowed roots"):  # a direct call raises it
        parallel_transcribe_tokenise(audio_root=str(outside))

    # Another audio root's results root: the hint names the parameter, not the CLI's flag.
    monkeypatch.delenv("AUDIO_PIPELINE_ALLOWED_ROOTS")
    results = tmp_path / "results"
    results.mkdir()
    (results / "_owner.json").write_text(json.dumps({"audio_root": "/elsewhere"}))
    state = parallel_transcribe_tokenise(audio_root=str(audio), results_root=str(results), return_state=True)
    assert state.is_failed() and "use another results_root" in state.message, state.message

    # The service down: the same run may work later (not tagged refused: test_deployment.py).
    url = f"http://127.0.0.1:{free_port()}"
    state = parallel_transcribe_tokenise(audio_root=str(audio), results_base=str(tmp_path / "by-root"),
                                         service_url=url, return_state=True)
    assert state.is_failed() and state.name == "Failed", state
    assert "not reachable" in state.message and "service_url" in state.message, state.message
    assert "refused" not in tags_of(state)
    assert not (tmp_path / "by-root").exists()  # a run that cannot start writes nothing

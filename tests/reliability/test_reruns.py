"""Reruns that never lie (issue 20): internal files are never results, refused files land in an
errors file that outlives the plan, and two first runs cannot both claim one results root.

The walk test runs the real CLI (a subprocess on the session's Prefect harness, a real local
Dask cluster) against a loopback service speaking the service's contract, so it can flag a clip
and count what is sent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tasks.access import canonical_root
from tasks.export import export
from tasks.export.reader import BadLine, iter_lines
from tasks.ownership import OWNER_FILE, owner_of
from tasks.plan import build_plan
from tasks.preflight import RunNotStartedError, preflight
from tasks.records import Provenance
from tasks.settings import PipelineSettings
from tasks.storage import REFUSED_ERRORS, Store, is_internal, output_of
from tests.reliability.conftest import cli_env, read_results, run_cli
from tests.tasks.contract_service import ContractService
from tests.tasks.steps import write_clip


def walk(results: Path) -> list[str]:
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())


def make_refusals(audio: Path) -> set[str]:
    """Files discovery refuses because their folder cannot be written: their ids as reported."""
    write_clip(audio / "p9.errors" / "c.flac", 9)  # would write p9.errors.jsonl, folder p9's errors file
    write_clip(audio / "_runs" / "x" / "e.flac", 10)  # its outputs would land among the run plans
    bad = os.fsencode(audio) + b"/q\xff"
    os.makedirs(bad, exist_ok=True)
    with open(bad + b"/d.flac", "wb") as f:
        f.write((audio / "p9.errors" / "c.flac").read_bytes())
    return {"p9.errors/c.flac", "_runs/x/e.flac", "q\\xff/d.flac"}


@pytest.mark.slow
def test_no_internal_file_is_ever_read_as_a_result_and_refused_files_outlive_the_plan(tmp_path, prefect_api_url):
    audio, results, exports = tmp_path / "audio", tmp_path / "results", tmp_path / "exports"
    for i, name in enumerate(("a", "b", "c")):
        write_clip(audio / "p1" / f"{name}.flac", i)
    write_clip(audio / "p2" / "d.flac", 3)
    (audio / "p1" / "bad\x01name.flac").write_bytes((audio / "p1" / "a.flac").read_bytes())  # refused, own folder
    refused = make_refusals(audio)
    env = cli_env(prefect_api_url, AUDIO_PIPELINE_TOKENIZER_OPTIONS='{"workload_size": 0}')
    with ContractService(flags={"c.flac": ["repetition"]}) as service:
        args = ["run", str(audio), "--results", str(results), "--service-url", service.url, "--tokenizer",
                "simulated", "--workers", "1", "--drop-flagged", "--export", "nemo", "--export-root", str(exports)]
        code, output = run_cli(args, env, tmp_path / "first.log")
        # Four files refused (exit 1), and nothing else wrong: no "stale" folder, no export error.
        assert code == 1, output
        assert "have results but no audio" not in output and "left out" not in output, output
        assert f"and {results}/{REFUSED_ERRORS} (refused at discovery)" in output, output
        assert " removed " in output  # the summary table's column (0 here: nothing vanished)
        stored = [json.loads(x) for x in (results / REFUSED_ERRORS).read_text().splitlines()]
        assert {e["id"] for e in stored} == refused and {e["stage"] for e in stored} == {"discover"}

        # What a run killed after planning leaves: a plan with its refused.jsonl, temp files.
        settings = PipelineSettings(audio_root=str(audio), results_root=str(results), tokenizer="simulated")
        build_plan(settings, Provenance(decode_fingerprint="fp", language=None, tokenizer_settings={}), None, 1,
                   run_id=f"20260101T000000Z-{uuid.uuid4().hex[:8]}")
        (results / ".tmp-killed.part").write_bytes(b'{"id": "p1/a.flac", "transc')
        (results / "p1.jsonl.tmp-0123abcd").write_bytes(b"{")  # a non-atomic store's temp name

        files = walk(results)
        outputs = {f: output_of(f) for f in files if output_of(f) is not None}
        assert sorted(outputs) == ["p1.errors.jsonl", "p1.jsonl", "p2.jsonl"], outputs
        # Every other file is one the layout names as the product's own (a new internal folder that
        # is not registered in tasks.storage.INTERNAL_DIRS fails here).
        assert [f for f in files if f not in outputs and not is_internal(f)] == []
        assert not [f for f in outputs if is_internal(f)]
        assert any(f.startswith("_runs/") and f.endswith("refused.jsonl") for f in files)
        assert {"_owner.json", "manifest.json", REFUSED_ERRORS} <= set(files)

        # Every reader asks the one rule: none takes an internal file for a folder's results.
        store = Store(str(results))
        assert store.folders_with_results() == {"p1", "p2"}
        samples = list(iter_lines(str(results)))
        assert not [s for s in samples if isinstance(s, BadLine)]
        assert sorted(s.id for s in samples) == ["p1/a.flac", "p1/b.flac", "p2/d.flac"]
        lines, errors = read_results(results)
        assert set(lines) == {"p1/a.flac", "p1/b.flac", "p2/d.flac"}
        assert {e["id"] for e in errors} == {"p1/bad\\x01name.flac", "p1/c.flac", *refused}
        assert export(str(results), "nemo", str(tmp_path / "by-hand")).failed == 0

        # Every bad name fixed: the rerun ends 0, with no stale folder and no export error, and the
        # refused list is gone with the last refused file.
        for path in (audio / "p9.errors" / "c.flac", audio / "_runs" / "x" / "e.flac",
                     audio / "p1" / "bad\x01name.flac"):
            path.unlink()
        os.unlink(os.fsencode(audio) + b"/q\xff/d.flac")
        code, output = run_cli(args, env, tmp_path / "second.log")
    assert code == 0, output
    assert "have results but no audio" not in output and "left out" not in output, output
    assert not (results / REFUSED_ERRORS).exists()


def test_two_first_runs_race_for_one_results_root_and_exactly_one_claims_it(tmp_path, monkeypatch):
    """Issue 20 case 5: the claim read `_owner.json` and then wrote it. Both runs here read "no
    owner" before either writes (they meet at a barrier right after that read), as two first runs
    started together can; exactly one may claim, the other must not start (exit 2's error)."""
    import tasks.ownership as ownership

    barrier, real, waited = threading.Barrier(2), ownership.owner_of, threading.local()

    def owner_after_both_read(store):
        found = real(store)
        if sys._getframe(1).f_locals.get("claim") and not getattr(waited, "done", False):
            waited.done = True
            barrier.wait(timeout=60)
        return found

    monkeypatch.setattr(ownership, "owner_of", owner_after_both_read)
    # Created up front: the write probe of two runs on a results root that does not exist yet
    # races of its own (each removes the folders it created; see the report of issue 20).
    results = tmp_path / "results"
    results.mkdir()
    outcomes: dict[str, object] = {}
    with ContractService() as service:
        def first_run(name: str) -> None:
            (tmp_path / name).mkdir()
            settings = PipelineSettings(audio_root=str(tmp_path / name), results_root=str(results),
                                        service_url=service.url, tokenizer="simulated")
            try:
                preflight(settings, claim=True)
                outcomes[name] = "claimed"
            except RunNotStartedError as e:
                outcomes[name] = e

        threads = [threading.Thread(target=first_run, args=(n,)) for n in ("audio-a", "audio-b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    claimed = [n for n, o in outcomes.items() if o == "claimed"]
    assert len(claimed) == 1 and len(outcomes) == 2, outcomes
    loser = next(o for o in outcomes.values() if o != "claimed")
    assert isinstance(loser, RunNotStartedError) and "holds the results of audio root" in str(loser)
    assert owner_of(Store(str(results))) == canonical_root(str(tmp_path / claimed[0]))
    assert json.loads((results / OWNER_FILE).read_text())["audio_root"].endswith(claimed[0])


def test_removed_lines_reach_the_summary_and_the_run_report(tmp_path):
    from flows.artifacts import run_report_markdown
    from flows.pipeline import summarise
    from tasks.records import FolderReport, RemovedLine

    gone = RemovedLine(id="p1/w1.wav", reason="not discovered by this run: the file is gone from the audio root")
    reports = [
        FolderReport(folder="p1", files=1, lines=2, jsonl="p1.jsonl", removed=1, removed_ids=[gone], kept=1),
        FolderReport(folder="p2", files=2, lines=2, jsonl="p2.jsonl"),
    ]
    settings = PipelineSettings(audio_root=str(tmp_path), results_root=str(tmp_path / "results"))
    summary = summarise(reports, settings, 1.0)
    assert (summary.removed, summary.removed_ids, summary.kept) == (1, [gone], 1)
    md = run_report_markdown(reports, Store(str(tmp_path / "results")), 1.0, None, [], [])
    assert "## Removed: 1 line(s) of earlier runs (first 1)" in md
    assert f"| p1/w1.wav | {gone.reason} |" in md
    assert "- kept: 1 line(s) of files this run did not list" in md

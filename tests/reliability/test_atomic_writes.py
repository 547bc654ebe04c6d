"""Local writes under SIGKILL: a reader sees the old complete file or the new one, never a torn one.

A child process rewrites a JSONL through `Store.write_bytes` with a payload big enough that the
kill lands mid-write; whatever the timing, the target holds one complete version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tasks.discover import list_audio
from tasks.merge import merge_folder
from tasks.records import AudioFile, Provenance, SourceInfo, Tokens, Transcription
from tasks.storage import Store
from tests.reliability.conftest import REPO, read_results, wait_until

WRITER = textwrap.dedent("""
    import sys
    from tasks.storage import Store
    store = Store(sys.argv[1])
    line = b'{"id": "p1/a.flac", "transcription": "new", "token_array": [' + b"1," * 4_000_000 + b'1]}\\n'
    print("writing", flush=True)
    while True:  # rewrite until killed, so the kill always lands inside some write
        store.write_bytes("p1.jsonl", line)
""")


def test_sigkill_during_a_write_never_tears_the_jsonl(tmp_path):
    results = tmp_path / "results"
    old = b'{"id": "p1/a.flac", "transcription": "old", "token_array": [1]}\n'
    Store(str(results)).write_bytes("p1.jsonl", old)
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(results)], cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"writing\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        body = (results / "p1.jsonl").read_bytes()
        assert body == old or (body.endswith(b"1]}\n") and body.count(b"\n") == 1), body[-50:]
        lines, errors = read_results(results)  # parses, one line, no duplicate ids
        assert list(lines) == ["p1/a.flac"] and errors == []
    # What a kill can leave: hidden `.tmp-*.part` files, which no reader or discovery picks up.
    leftovers = [p.name for p in results.iterdir() if p.name != "p1.jsonl"]
    assert all(n.startswith(".tmp-") and n.endswith(".part") for n in leftovers), leftovers
    files, _ = list_audio(str(results), (".flac", ".jsonl", ".part"))
    assert [f.id for f in files] == ["p1.jsonl"]


def test_results_get_the_mode_of_a_normally_written_file(tmp_path):
    """Regression: mkstemp's 0600 survived the rename, so JSONL and intermediates were unreadable
    to everyone but the writer (e.g. a training job running as another user)."""
    umask = os.umask(0o022)
    os.umask(umask)
    store = Store(str(tmp_path / "results"))
    source = SourceInfo(size=1, mtime="0")
    store.write_record("transcriptions", Transcription(
        id="p1/a.flac", text="hi", language="en", duration=1.0, model="m", service_url="u", source=source,
        decode_fingerprint="fp"))
    store.write_record("tokens", Tokens(id="p1/a.flac", token_array=[1], tokenizer="t", tokenizer_settings={},
                                        source=source))
    expect = Provenance(decode_fingerprint="fp", language=None, tokenizer_settings={})
    report = merge_folder("p1", [AudioFile(id="p1/a.flac", path="/a/p1/a.flac", source=source)], store, expect)
    assert report.lines == 1
    reference = tmp_path / "plain"
    reference.write_bytes(b"x")
    for path in (tmp_path / "results" / "p1.jsonl", tmp_path / "results" / "tokens" / "p1" / "a.json",
                 tmp_path / "results" / ".index" / "p1.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_wait_until_is_bounded():
    """The helper every fault test waits with gives up on time, naming what it waited for, and
    sleeps between polls (counted, not timed: 0.3 s at one poll per 0.1 s is at most 5 polls)."""
    polls: list[None] = []
    with pytest.raises(TimeoutError, match="nothing"):
        wait_until(lambda: polls.append(None), 0.3, "nothing", 0.1)
    assert 1 <= len(polls) <= 5

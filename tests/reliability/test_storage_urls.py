"""Audio and results on fsspec URLs: `memory://` (in-process) and a real S3-compatible server.

The S3 server is moto's, started by the test on 127.0.0.1; the pipeline finds it through the
environment only (`FSSPEC_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`), because
`tasks` passes no storage_options: the CLI process and the Dask worker processes it spawns
inherit that environment.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from flows.pipeline import parallel_transcribe_tokenise
from flows.runner import cluster_plan
from tasks.discover import list_audio
from tasks.records import Tokens
from tasks.settings import PipelineSettings
from tasks.storage import Store
from tasks.tokenise import tokeniser_for
from tasks.provenance import tokens_problem, transcription_problem, transcription_reusable
from tasks.records import Provenance
from tests.conftest import DEMO_AUDIO, DEMO_REFERENCES
from tests.metrics import transcribe_requests
from tests.reliability.conftest import cli_env, run_cli
from tests.wer import wer

REFERENCES: dict[str, str] = json.loads(DEMO_REFERENCES.read_text())
FOLDERS = ("p225", "p226")


def upload_demo(fs, root: str) -> list[str]:
    ids = sorted(i for i in REFERENCES if i.split("/")[0] in FOLDERS)
    for i in ids:
        fs.pipe_file(f"{root}/{i}", (DEMO_AUDIO / i).read_bytes())
    return ids


def read_jsonl(fs, path: str) -> list[dict]:
    return [json.loads(x) for x in fs.cat_file(path).decode().splitlines()]


def check_outputs(fs, results: str, ids: list[str]) -> None:
    lines = {}
    for folder in FOLDERS:
        records = read_jsonl(fs, f"{results}/{folder}.jsonl")
        assert [r["id"] for r in records] == [i for i in ids if i.startswith(folder + "/")]
        lines.update({r["id"]: r for r in records})
    assert wer([REFERENCES[i] for i in ids], [lines[i]["transcription"] for i in ids]) <= 0.25
    assert all(lines[i]["token_array"] for i in ids)
    assert fs.exists(f"{results}/transcriptions/p225/p225_001_mic2.json")
    assert fs.exists(f"{results}/tokens/p226/p226_001_mic2.json")


# --- memory:// -------------------------------------------------------------------------------


def test_memory_roots_plan_threads_and_refuse_a_remote_cluster():
    """Regression: with memory:// roots the plan started worker *processes*, each with its own
    empty memory filesystem: no audio to read, and their intermediates lost to the merge."""
    plan = cluster_plan(PipelineSettings(audio_root="memory://a", results_root="/tmp/r", n_workers=2), gpus=1)
    assert plan["kind"] == "local" and plan["cluster_kwargs"]["processes"] is False
    assert cluster_plan(PipelineSettings(audio_root="/a", results_root="/r", n_workers=2), gpus=0)["cluster_kwargs"]["processes"]
    with pytest.raises(ValueError, match="memory://"):
        cluster_plan(PipelineSettings(audio_root="/a", results_root="memory://r", dask_address="tcp://127.0.0.1:1"))


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_memory_audio_and_results_end_to_end(whisper_service_url):
    fs = fsspec.filesystem("memory")
    run = uuid.uuid4().hex[:8]
    audio, results = f"memory://audio-{run}", f"memory://results-{run}"
    ids = upload_demo(fs, f"/audio-{run}")
    summary = parallel_transcribe_tokenise(
        audio_root=audio, results_root=results, service_url=whisper_service_url, n_workers=1, batch_size=2,
    )
    assert summary.failed == 0 and summary.lines == len(ids), summary.errors
    check_outputs(fs, f"/results-{run}", ids)
    before = transcribe_requests(whisper_service_url)
    again = parallel_transcribe_tokenise(
        audio_root=audio, results_root=results, service_url=whisper_service_url, n_workers=1, batch_size=2,
    )
    # All reused, when the service names its decode fingerprint; one that names none gives no
    # model identity, so everything is transcribed again (issue 12 item 7).
    resent = 0 if service_fingerprint(whisper_service_url) else len(ids)
    assert again.lines == len(ids) and transcribe_requests(whisper_service_url) - before == resent


# --- S3 (moto on loopback) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.mark.slow
def test_s3_audio_and_results_through_the_cli(s3_endpoint, whisper_service_url, prefect_api_url, tmp_path,
                                              monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    fs.mkdir("corpus")
    fs.mkdir("out")
    ids = upload_demo(fs, "corpus/vctk")
    fs.pipe_file("corpus/vctk/p226/broken.flac", b"not audio at all")
    # The endpoint reaches the pipeline only through the environment, as it would in production.
    env = cli_env(prefect_api_url, FSSPEC_S3_ENDPOINT_URL=s3_endpoint, **S3_ENV)
    args = ["run", "s3://corpus/vctk", "--results", "s3://out/run", "--service-url", whisper_service_url,
            "--batch-size", "2", "--workers", "1"]  # its own LocalCluster: worker processes inherit the env
    before = transcribe_requests(whisper_service_url)
    code, output = run_cli(args, env, tmp_path / "s3.log")
    assert code == 1 and "1 file(s) failed" in output, output
    assert transcribe_requests(whisper_service_url) - before == len(ids) + 1
    fs.invalidate_cache()
    check_outputs(fs, "out/run", ids)
    errors = read_jsonl(fs, "out/run/p226.errors.jsonl")
    assert {(e["id"], e["stage"]) for e in errors} == {("p226/broken.flac", "decode")}
    assert not [p for p in fs.find("out/run") if ".tmp-" in p]  # object stores: whole PUTs, no temp names

    # A rerun would send nothing again: listing S3 now gives every file the same source identity
    # (size, ETag) that its intermediates recorded, so all of them are reusable (given a
    # service that names its decode fingerprint; without one nothing is).
    for key, value in {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})  # what the env var does at import
    settings = PipelineSettings(audio_root="s3://corpus/vctk", results_root="s3://out/run")
    files, _ = list_audio(settings.audio_root, settings.extensions)
    store = Store(settings.results_root)
    fingerprint = service_fingerprint(whisper_service_url)
    expect = Provenance(decode_fingerprint=fingerprint, language=None,  # as the flow builds it
                        tokenizer_settings=json.loads(json.dumps(tokeniser_for(settings).settings)))
    assert sorted(f.id for f in files) == sorted([*ids, "p226/broken.flac"])
    for f in files:
        if f.id == "p226/broken.flac":
            continue  # failures are never reused: a rerun tries the file again
        record = store.read_transcription(f.id)
        assert transcription_problem(record, f, expect) is None, f.id
        assert transcription_reusable(record, f, expect) == bool(fingerprint), f.id
        tokens = store.read_tokens(f.id)
        assert isinstance(tokens, Tokens) and tokens_problem(tokens, f, expect) is None, f.id


def service_fingerprint(url: str) -> str | None:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=10).json().get("fingerprint")



def test_s3_same_size_same_second_overwrite_is_redone_and_an_unchanged_object_is_not(s3_endpoint, monkeypatch):
    """Issue 20 case 3: S3's LastModified has 1 s resolution, so two PUTs of the same size in one
    second looked like one version and the new audio kept the old transcript and tokens. The
    source key now carries the ETag. moto's clock is held on one instant, so both PUTs get the
    same LastModified, exactly what a script re-uploading fixed-length clips gets on S3."""
    import io

    import moto.s3.models
    import numpy as np
    import s3fs
    import soundfile as sf

    from tests.tasks.contract_service import ContractService
    from tests.tasks.steps import expect_for, read_jsonl as read_store_jsonl, run_steps, settings_for

    for key, value in {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    instant = moto.s3.models.utcnow()
    monkeypatch.setattr(moto.s3.models, "utcnow", lambda: instant)

    def wav(seed: int) -> bytes:
        out = io.BytesIO()
        sf.write(out, (0.1 * np.random.default_rng(seed).standard_normal(6400)).astype(np.float32), 16_000,
                 format="WAV")
        return out.getvalue()

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
    bucket = f"identity-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/audio/p1/u1.wav", wav(1))
    fs.pipe_file(f"{bucket}/audio/p1/u2.wav", wav(2))
    with ContractService() as service:
        settings = settings_for(f"s3://{bucket}/audio", f"s3://{bucket}/results", service.url)
        store = Store(settings.results_root)
        expect = expect_for(settings)
        run_steps(settings, store, expect)
        first = {r["id"]: r for r in read_store_jsonl(store, "p1.jsonl")}
        before = fs.info(f"{bucket}/audio/p1/u1.wav")
        fs.pipe_file(f"{bucket}/audio/p1/u1.wav", wav(3))  # new audio, same size, same second
        fs.invalidate_cache()
        after = fs.info(f"{bucket}/audio/p1/u1.wav")
        assert (after["size"], after["LastModified"]) == (before["size"], before["LastModified"])
        assert after["ETag"] != before["ETag"]

        sent = len(service.requests)
        again = run_steps(settings, store, expect)
        assert service.requests[sent:] == ["u1.wav"]  # re-transcribed; the unchanged u2 is not
        assert (again.stage("tokenise").done, again.stage("tokenise").reused) == (1, 1)  # re-tokenised
        lines = {r["id"]: r for r in read_store_jsonl(store, "p1.jsonl")}
        sent = len(service.requests)
        run_steps(settings, store, expect)
        assert len(service.requests) == sent  # and nothing changed: nothing sent
    assert lines["p1/u1.wav"]["transcription"] != first["p1/u1.wav"]["transcription"]
    assert lines["p1/u2.wav"] == first["p1/u2.wav"]
    assert store.read_tokens("p1/u1.wav").source.mtime == f"etag:{after['ETag'].strip(chr(34))}"

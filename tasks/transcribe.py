"""HTTP client of the Whisper service and the transcription stage of a shard.

Retries with exponential backoff on connection errors, timeouts and 5xx only: a 4xx means the
file itself is bad (not audio, too large), and sending it again cannot help. A 429 is the one
exception: the service is busy, not the file bad, so the client waits the `Retry-After` it was
given (plus jitter, so many clients do not come back in step) and sends again without counting a
retry, for at most `http_timeout_s` of waiting in all.
"""

from __future__ import annotations

import functools
import random
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import get_args

import httpx

from tasks.folder_index import reusable_ids
from tasks.provenance import transcription_reusable
from tasks.records import AudioFile, Failure, Provenance, QualityFlag, StageReport, Transcription, TranscriptQuality
from tasks.settings import PipelineSettings
from tasks.audio_stream import open_source, read_span, span_flac
from tasks.storage import Store, read_source, stem_id
from whisper_service.audio import AudioDecodeError


class ServiceError(RuntimeError):
    """The Whisper service could not give an answer for a request."""


class ServiceUnavailableError(ServiceError, ConnectionError):
    """The service cannot be reached (or never became ready); no work was scheduled."""


class ServiceRejectedError(ServiceError, ValueError):
    """The service refused this file with a 4xx: retrying will not help."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"service answered {status}: {reason}")
        self.status = status
        self.reason = reason


class ServiceOverloadedError(ServiceError):
    """The service kept answering 429 (queue full) for longer than the client may wait."""


DEFAULT_RETRY_AFTER_S = 1.0  # when a 429 has no usable Retry-After header
JITTER = 0.5  # each wait is Retry-After x uniform(1, 1 + JITTER): clients spread out, never early


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context, built once per process: building it (loading the CA bundle)
    costs 50-120 ms of CPU, and every transcribe task opens a client."""
    return httpx.create_ssl_context()


class ServiceClient:
    """A pooled httpx client for `POST /transcribe`, with bounded retries and 429 waits."""

    def __init__(self, settings: PipelineSettings) -> None:
        headers = {}
        if settings.service_token is not None:
            headers["Authorization"] = f"Bearer {settings.service_token.get_secret_value()}"
        self.settings = settings
        self.url = settings.service_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(settings.http_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=settings.http_concurrency),
            verify=tls_context(),
        )

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def health(self) -> dict:
        """`GET /healthz` once. Raises httpx errors as they come."""
        response = self._client.get("/healthz", timeout=5.0)
        body = _json_or_text(response)
        return {"status_code": response.status_code, **(body if isinstance(body, dict) else {})}

    def transcribe(self, data: bytes, filename: str, language: str | None = None) -> dict:
        """Transcribe one file's bytes; returns the service's JSON.

        Raises:
            ServiceRejectedError: 4xx but 429 (bad file, bad token): not retried.
            ServiceOverloadedError: still 429 after `http_timeout_s` of waiting.
            ServiceError: still failing after `http_retries` retries.
        """
        form = {"language": language} if language else None
        delay = self.settings.http_backoff_s
        last: str = ""
        waited = 0.0  # seconds spent honouring 429s: bounded, and not counted as retries
        attempt = 0
        while attempt <= self.settings.http_retries:
            try:
                response = self._client.post(
                    "/transcribe", files={"file": (filename, data)}, data=form
                )
            except httpx.TransportError as e:  # connect/read errors and timeouts
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code == 429:
                    pause = self._overload_pause(response, waited)
                    time.sleep(pause)
                    waited += pause
                    continue
                if response.status_code < 400:
                    return response.json()
                reason = _error_reason(response)
                if response.status_code < 500:
                    raise ServiceRejectedError(response.status_code, reason)
                last = f"{response.status_code}: {reason}"
            attempt += 1
            if attempt <= self.settings.http_retries:
                time.sleep(delay)
                delay *= 2
        raise ServiceError(
            f"{self.url}/transcribe failed after {self.settings.http_retries + 1} attempts: {last}"
        )

    def _overload_pause(self, response: httpx.Response, waited: float) -> float:
        """How long to wait after a 429; raises once the total wait would pass `http_timeout_s`."""
        budget = self.settings.http_timeout_s - waited
        if budget <= 0:
            raise ServiceOverloadedError(
                f"{self.url}/transcribe still overloaded (429) after waiting {waited:.0f} s: "
                f"{_error_reason(response)}"
            )
        try:
            retry_after = max(0.0, float(response.headers.get("Retry-After", "")))
        except ValueError:  # absent, or an HTTP date: fall back to a short default
            retry_after = DEFAULT_RETRY_AFTER_S
        retry_after = retry_after or DEFAULT_RETRY_AFTER_S
        return min(budget, retry_after * random.uniform(1.0, 1.0 + JITTER))


def check_service(settings: PipelineSettings) -> dict:
    """Fail fast, before scheduling any work, if the service is down; wait while it loads.

    Returns the `/healthz` body (it names the model). Raises ServiceUnavailableError saying
    which URL failed and how to start the service.
    """
    how = (
        f"Start it with `audio-pipeline serve --port {httpx.URL(settings.service_url).port or 80}`"
        " or pass --service-url."
    )
    deadline = time.monotonic() + settings.service_wait_s
    with ServiceClient(settings) as client:
        while True:
            try:
                health = client.health()
            except httpx.TransportError as e:
                raise ServiceUnavailableError(
                    f"Whisper service not reachable at {client.url} ({type(e).__name__}). {how}"
                ) from e
            if health["status_code"] == 200:
                return health
            if health["status_code"] in (401, 403):
                raise ServiceUnavailableError(f"Whisper service at {client.url} refused the token.")
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"Whisper service at {client.url} not ready after {settings.service_wait_s:.0f} s"
                    f" (healthz {health['status_code']}). {how}"
                )
            time.sleep(0.5)


def transcribe_files(
    files: list[AudioFile], settings: PipelineSettings, store: Store, expect: Provenance, shard: int = 0,
    spans: dict[str, tuple[float, float]] | None = None,
) -> StageReport:
    """Transcribe the files this run cannot reuse (`tasks.provenance`); one intermediate per file.

    Reuse is decided from each folder's slim index (one read per folder, keys only: no text),
    plus one bulk read of the intermediates of the files the index does not vouch for. Each
    record written carries `expect.run_id`. A file in `spans` is a segment of a long recording:
    only its samples are read (seeking into the source) and uploaded, as 16 kHz FLAC.
    """
    spans = spans or {}
    done = reusable_ids(store, "transcriptions", files, expect, transcription_reusable)
    todo = [f for f in files if f.id not in done]
    outcomes: list[Transcription | Failure] = []
    if todo:
        with ServiceClient(settings) as client, ThreadPoolExecutor(settings.http_concurrency) as pool:
            outcomes = list(pool.map(lambda f: _transcribe_one(client, f, expect, store, spans.get(f.id)), todo))
    failed = sum(isinstance(o, Failure) for o in outcomes)
    return StageReport(
        stage="transcribe", shard=shard, files=len(files), done=len(todo) - failed,
        reused=len(files) - len(todo), failed=failed,
        audio_seconds=sum(o.duration for o in outcomes if isinstance(o, Transcription)),
    )


def _transcribe_one(
    client: ServiceClient, file: AudioFile, expect: Provenance, store: Store, span: tuple[float, float] | None = None,
) -> Transcription | Failure:
    try:
        data = read_source(file.path) if span is None else segment_upload(file.path, *span)
    except AudioDecodeError as e:
        record = Failure(id=file.id, stage="decode", error=str(e), source=file.source)
        store.write_record("transcriptions", record)
        return record
    except OSError as e:
        record: Transcription | Failure = Failure(
            id=file.id, stage="decode", error=f"cannot read file: {e}", source=file.source
        )
        store.write_record("transcriptions", record)
        return record
    try:
        name = file.id.rsplit("/", 1)[-1] if span is None else f"{stem_id(file.id).rsplit('/', 1)[-1]}.flac"
        body = client.transcribe(data, name, expect.language)
        record = transcription_from_response(body, file, client.url, expect.language, expect.run_id)
    except ServiceRejectedError as e:
        stage = "decode" if e.status in (400, 415, 422) else "transcribe"
        record = Failure(id=file.id, stage=stage, error=e.reason, source=file.source)
    except (ServiceError, KeyError, ValueError, TypeError) as e:
        record = Failure(id=file.id, stage="transcribe", error=str(e), source=file.source)
    store.write_record("transcriptions", record)
    return record


def segment_upload(path: str, start: float, end: float) -> bytes:
    """A segment's samples as 16 kHz FLAC bytes, read from the source by seeking (never the whole file).

    Raises:
        AudioDecodeError: the span cannot be decoded.
        OSError: the source cannot be read.
    """
    with open_source(path) as f:
        audio = read_span(f, start, end)[0]
    return span_flac(audio)


def transcription_from_response(
    body: dict, file: AudioFile, service_url: str, requested_language: str | None, run_id: str | None = None
) -> Transcription:
    """The intermediate for one `POST /transcribe` answer.

    The decode fingerprint is the one the answer names (not the one `/healthz` named at the start
    of the run): a service restarted mid-run with other settings then yields records that merge
    refuses as stale instead of mixing two models' text. A service older than the quality fields
    gives `quality=None`; flags this client does not know are left out.

    Raises:
        KeyError, ValueError, TypeError: the answer is not a transcription.
    """
    quality = None
    if any(key in body for key in _QUALITY_KEYS):
        quality = TranscriptQuality(
            **{key: body.get(key) for key in _QUALITY_KEYS if key != "flags"},
            flags=[f for f in body.get("flags") or [] if f in _KNOWN_FLAGS],
        )
    return Transcription(
        id=file.id, text=body["text"], language=body.get("language") or "",
        duration=float(body.get("duration") or 0.0), model=body.get("model") or "",
        service_url=service_url, source=file.source, engine=body.get("engine") or "",
        decode_fingerprint=body.get("fingerprint") or "", requested_language=requested_language,
        quality=quality, run_id=run_id,
    )


_QUALITY_KEYS = tuple(TranscriptQuality.model_fields)
_KNOWN_FLAGS = set(get_args(QualityFlag))


def _json_or_text(response: httpx.Response) -> dict | str:
    try:
        return response.json()
    except ValueError:
        return response.text


def _error_reason(response: httpx.Response) -> str:
    body = _json_or_text(response)
    if isinstance(body, dict):
        return str(body.get("error") or body.get("detail") or body)
    return body[:300] or response.reason_phrase


# -- Prefect task ------------------------------------------------------------------------------
from prefect import task  # noqa: E402  (wrappers last: the functions above work without Prefect)
from prefect.cache_policies import NONE as NO_CACHE  # noqa: E402


@task(name="transcribe-shard", task_run_name="transcribe-shard-{index}", retries=1,
      retry_delay_seconds=5, cache_policy=NO_CACHE)
def transcribe_shard(plan: str, index: int, settings: PipelineSettings) -> StageReport:
    """Transcribe every file of shard `index` of the run plan at `plan` (bounded concurrency)."""
    from tasks.plan import load_plan, load_shard

    from tasks.long_plan import expand_shard

    run, shard = load_plan(plan), load_shard(plan, index)
    batches, spans = expand_shard(plan, index, shard.batches, settings, run.settings)  # long files: their segments
    files = [f for batch in batches for f in batch.files]
    return transcribe_files(files, settings, Store(settings.results_root), run.provenance, index, spans)

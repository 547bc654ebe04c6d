"""HTTP routes: `/transcribe`, OpenAI's `/v1/audio/transcriptions`, `/healthz`, `/metrics`.

Routes only read uploaded bytes and form fields; no filesystem path ever comes from a request.
Request problems raise `ServiceError` (an HTTPException with a metrics reason); the app's
exception handlers turn every error into `{"error": "..."}`.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Annotated

import soundfile as sf
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from whisper_service.audio import AudioDecodeError, decode_audio
from whisper_service.batching import Batcher, BatcherClosedError, ClientGoneError, DisconnectCheck, QueueFullError
from whisper_service.decode_options import DecodeOptions
from whisper_service.engines.base import Engine, Transcript
from whisper_service.metrics import ServiceMetrics
from whisper_service.subtitles import to_srt, to_vtt
from whisper_service.schemas import (
    ErrorResponse,
    HealthResponse,
    OpenAISegment,
    OpenAITranscription,
    OpenAIVerboseTranscription,
    ResponseFormat,
    TranscriptionResponse,
)
from whisper_service.settings import WhisperServiceSettings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = "5"  # hint for clients polling a loading service


class ServiceError(HTTPException):
    """A request the service refuses or fails, with the `whisper_errors_total` reason."""

    def __init__(
        self, status_code: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.reason = reason


@dataclass
class ServiceState:
    """Per-app state: settings, metrics, and the engine once the lifespan has loaded it."""

    settings: WhisperServiceSettings
    metrics: ServiceMetrics
    engine: Engine | None = None
    batcher: Batcher | None = None
    load_error: str | None = None

    def ready(self) -> tuple[Engine, Batcher]:
        if self.engine is None or self.batcher is None:
            if self.load_error is not None:
                raise ServiceError(503, "not_ready", f"model failed to load: {self.load_error}")
            raise ServiceError(
                503, "not_ready", "model is still loading; retry when /healthz answers 200",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        return self.engine, self.batcher


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


ServiceDep = Annotated[ServiceState, Depends(get_state)]
UploadDep = Annotated[UploadFile, File(description="Audio bytes: FLAC, WAV, OGG (soundfile).")]
LanguageDep = Annotated[
    str | None, Form(description="ISO 639-1 code, e.g. 'en'; empty: the service default.")
]

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 500, 503)}
router = APIRouter()


@router.post("/transcribe", response_model=TranscriptionResponse, responses=ERRORS)
async def transcribe(
    state: ServiceDep, request: Request, file: UploadDep, language: LanguageDep = None
) -> TranscriptionResponse:
    """Transcribe one uploaded clip: the text, what produced it, and its quality fields."""
    engine, transcript = await transcribe_upload(
        state, file, language, route="/transcribe", is_disconnected=request.is_disconnected
    )
    return TranscriptionResponse(
        text=transcript.text,
        language=transcript.language,
        duration=transcript.duration,
        model=engine.model_name,
        engine=engine.name,
        fingerprint=engine.options.fingerprint,
        language_probability=transcript.language_probability,
        avg_logprob=transcript.avg_logprob,
        no_speech_prob=transcript.no_speech_prob,
        compression_ratio=transcript.compression_ratio,
        temperature=transcript.temperature,
        words_per_second=transcript.words_per_second,
        flags=list(transcript.flags),
    )


@router.post(
    "/v1/audio/transcriptions",
    response_model=OpenAITranscription | OpenAIVerboseTranscription,
    responses=ERRORS,
)
async def openai_transcriptions(
    state: ServiceDep,
    request: Request,
    file: UploadDep,
    model: Annotated[str, Form(description="Accepted and ignored: the loaded model answers.")] = (
        "whisper-1"
    ),
    language: LanguageDep = None,
    prompt: Annotated[
        str | None, Form(description="Text the decoder is conditioned on (Whisper's initial prompt).")
    ] = None,
    temperature: Annotated[
        float | None,
        Form(ge=0, le=1, description="0: the service's fallback ladder; above 0: that temperature only."),
    ] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    granularities: Annotated[
        list[str] | None, Form(alias="timestamp_granularities[]", description="segment only.")
    ] = None,
    granularities_plain: Annotated[
        list[str] | None, Form(alias="timestamp_granularities", include_in_schema=False)
    ] = None,
) -> Response | OpenAITranscription | OpenAIVerboseTranscription:
    """OpenAI's transcription endpoint, so existing OpenAI clients work unchanged.

    `prompt` and `temperature` go into the decode options (a different fingerprint);
    `timestamp_granularities` must be `segment` with `verbose_json`: anything else is a 400
    naming what is not supported, never silently ignored.
    """
    _check_granularities([*(granularities or []), *(granularities_plain or [])], response_format)
    engine, _ = state.ready()
    options = engine.options.for_request(temperature=temperature, prompt=prompt)
    route = "/v1/audio/transcriptions"
    _, transcript = await transcribe_upload(
        state, file, language, route=route, options=options, is_disconnected=request.is_disconnected
    )
    if response_format == "text":
        return PlainTextResponse(transcript.text)
    if response_format == "srt":
        return PlainTextResponse(to_srt(transcript.segments))
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(transcript.segments), media_type="text/vtt")
    if response_format == "verbose_json":
        return OpenAIVerboseTranscription(
            language=transcript.language,
            duration=transcript.duration,
            text=transcript.text,
            segments=_openai_segments(transcript),
        )
    return OpenAITranscription(text=transcript.text)


def _check_granularities(granularities: list[str], response_format: str) -> None:
    """OpenAI's rules, honestly: segment timestamps come with verbose_json; no word timestamps."""
    if not granularities:
        return
    unsupported = sorted(set(granularities) - {"segment"})
    if unsupported:
        raise ServiceError(
            400, "invalid_request",
            f"timestamp_granularities {unsupported} not supported: this service gives "
            "segment timestamps only",
        )
    if response_format != "verbose_json":
        raise ServiceError(
            400, "invalid_request",
            "timestamp_granularities needs response_format=verbose_json "
            f"(got {response_format!r})",
        )


def _openai_segments(transcript: Transcript) -> list[OpenAISegment]:
    single = len(transcript.segments) == 1  # the clip's scores are this segment's scores
    return [
        OpenAISegment(
            id=i,
            start=segment.start,
            end=segment.end,
            text=segment.text,
            avg_logprob=transcript.avg_logprob if single else None,
            compression_ratio=transcript.compression_ratio if single else None,
            no_speech_prob=transcript.no_speech_prob if single else None,
            temperature=transcript.temperature if single else None,
        )
        for i, segment in enumerate(transcript.segments)
    ]


@router.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def healthz(state: ServiceDep) -> JSONResponse:
    """200 once the model is loaded; 503 while loading or after a failed load."""
    engine = state.engine
    if engine is not None:
        options = engine.options
        ok = HealthResponse(
            status="ok",
            engine=engine.name,
            model=engine.model_name,
            device=engine.device,
            weights_sha256=options.weights_sha256,
            decode=options.model_dump(mode="json"),
            fingerprint=options.fingerprint,
        )
        return JSONResponse(ok.model_dump(exclude_none=True))
    if state.load_error is not None:
        failed = HealthResponse(status="failed", error=state.load_error)
        return JSONResponse(failed.model_dump(exclude_none=True), 503)
    loading = HealthResponse(status="loading")
    return JSONResponse(
        loading.model_dump(exclude_none=True), 503, headers={"Retry-After": RETRY_AFTER_S}
    )


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: ServiceDep, request: Request) -> Response:
    """Prometheus text exposition; names are documented in `whisper_service.metrics`."""
    body, content_type = state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)


async def transcribe_upload(
    state: ServiceState,
    upload: UploadFile,
    language: str | None,
    *,
    route: str,
    options: DecodeOptions | None = None,
    is_disconnected: DisconnectCheck | None = None,
) -> tuple[Engine, Transcript]:
    """Shared by both transcription routes: validate, decode, batch, count.

    `options` None (or equal to the engine's) decodes with the engine's defaults, so such
    requests share batches whatever route they came by.

    Raises:
        ServiceError: 400 empty/undecodable upload or bad language, 413 over the size limit,
            503 model not ready, 500 engine failure.
    """
    engine, batcher = state.ready()
    limit = state.settings.max_upload_bytes
    size = upload.size
    if size is not None and size > limit:
        raise ServiceError(413, "too_large", f"upload is {size} bytes; the limit is {limit} bytes")
    data = await upload.read()
    if len(data) > limit:  # in case the parser did not report a size
        raise ServiceError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
    if not data:
        raise ServiceError(400, "empty_upload", "empty upload: the 'file' field has 0 bytes")
    _admit_before_decoding(batcher, data)
    try:
        audio = await run_in_threadpool(
            decode_audio, data, max_seconds=state.settings.max_audio_seconds,
            max_samples=state.settings.max_decoded_samples,
        )
    except AudioDecodeError as e:
        raise ServiceError(400, "not_audio", f"{e}; send FLAC, WAV or OGG audio") from e
    language = (language or "").strip().lower() or state.settings.language
    if options == engine.options:
        options = None
    try:
        transcript = await batcher.transcribe(audio, language, options, is_disconnected=is_disconnected)
    except QueueFullError:
        raise  # the app's handler answers 429 with Retry-After
    except ClientGoneError as e:  # nobody reads this answer; 499 keeps it out of the 5xx counts
        raise ServiceError(499, "client_gone", str(e)) from e
    except BatcherClosedError as e:
        raise ServiceError(503, "not_ready", str(e)) from e
    except ValueError as e:  # engines raise ValueError for what the request asked (e.g. language)
        raise ServiceError(400, "invalid_request", str(e)) from e
    except Exception as e:  # any other engine failure is ours: 500, logged with its traceback
        logger.exception("transcription failed")
        message = f"transcription failed: {type(e).__name__}: {e}"
        raise ServiceError(500, "engine_error", message) from e
    state.metrics.transcriptions.labels(route=route).inc()
    state.metrics.audio_seconds.inc(transcript.duration)
    return engine, transcript


def _admit_before_decoding(batcher: Batcher, data: bytes) -> None:
    """Refuse with 429 from the header alone when the clip's lane is full, so an overloaded
    service spends no decode or resample on requests it turns away (QueueFullError -> 429)."""
    try:
        header = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        return  # not audio: the decode answers 400 with the reason
    if header.samplerate > 0 and header.frames < 1 << 62:  # 1 << 62: libsndfile's "length unknown"
        batcher.admit(batcher.lane_for(header.frames / header.samplerate))

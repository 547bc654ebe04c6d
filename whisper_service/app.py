"""`create_app(settings)`: the Whisper service as a FastAPI app; `serve(settings)` runs it.

The model loads in a background thread started by the lifespan, so the server accepts
connections at once and `/healthz` answers 503 `{"status": "loading"}` until it is ready.
A pure-ASGI guard checks the bearer token and the body size before any byte of the body is
read: an unauthenticated or oversized upload is refused without being spooled to disk.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from whisper_service.batching import Batcher, QueueFullError
from whisper_service.engines import default_batch_size, load_engine
from whisper_service.engines.base import Engine
from whisper_service.engines.models import resolve_model
from whisper_service.metrics import MetricsMiddleware, ServiceMetrics
from whisper_service.routes import ServiceError, ServiceState, router
from whisper_service.settings import WhisperServiceSettings

logger = logging.getLogger(__name__)

FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and the small text fields
OPEN_PATHS = frozenset({"/healthz"})  # reachable without the token (load balancers, k8s probes)


def create_app(
    settings: WhisperServiceSettings,
    engine: Engine | None = None,
    *,
    load: Callable[[], Engine] | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: validated service settings.
        engine: an already-loaded engine to serve (the caller keeps ownership and closes it).
        load: how to load the engine in the background; default `load_engine(settings.engine,
            settings.model, settings.device, settings.decode_knobs())` (engine "auto" picks by
            hardware). Ignored when `engine` is given.
    """
    state = ServiceState(settings=settings, metrics=ServiceMetrics())
    loader = load or (
        lambda: load_engine(
            settings.engine, settings.model, settings.device, settings.decode_knobs(),
            workers=settings.engine_workers,
        )
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load_and_start(state, engine, loader), name="whisper-load")
        try:
            yield
        finally:
            task.cancel()
            if state.batcher is not None:
                await state.batcher.stop()
            if engine is None and state.engine is not None:
                state.engine.close()  # only what we loaded; a passed-in engine is the caller's
            state.metrics.model_loaded.set(0)

    app = FastAPI(title="whisper-service", lifespan=lifespan)
    app.state.service = state
    app.include_router(router)
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(QueueFullError, _queue_full)  # type: ignore[arg-type]
    app.add_middleware(RequestGuard, settings=settings, metrics=state.metrics)
    paths = frozenset(getattr(route, "path", "") for route in router.routes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, paths=paths)  # outermost: sees all
    return app


def serve(settings: WhisperServiceSettings) -> None:
    """Run the service in the foreground until interrupted (`audio-pipeline serve` calls this).

    Raises:
        ModelNotAvailableError: `settings.model` is not on this machine. Checked before binding
            (cheap: no weights are read), so a typo fails the command instead of leaving a
            server whose /healthz never turns 200.
    """
    resolve_model(settings.model)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


async def _load_and_start(
    state: ServiceState, engine: Engine | None, loader: Callable[[], Engine]
) -> None:
    if engine is None:
        try:
            engine = await asyncio.to_thread(loader)
        except Exception as e:  # reported by /healthz and every route, not a crash loop
            logger.exception("loading the Whisper model failed")
            state.load_error = f"{type(e).__name__}: {e}"
            return
    s = state.settings
    batcher = Batcher(
        engine, s.max_batch_size or default_batch_size(engine.device, engine.name), s.max_wait_ms, state.metrics,
        max_queue=s.max_queue, workers=getattr(engine, "workers", 1),
    )
    batcher.start()
    state.metrics.track_queues(batcher.depth)
    state.batcher, state.engine = batcher, engine
    state.metrics.model_loaded.set(1)
    logger.info(
        "ready: %s %s on %s, decode fingerprint %s (%s)",
        engine.name, engine.model_name, engine.device, engine.options.fingerprint[:12],
        engine.options.canonical_json(),
    )


class UploadTooLargeError(ServiceError):
    """Raised from `receive` mid-stream; FastAPI's form parsing re-raises HTTPExceptions as is."""

    def __init__(self, limit: int) -> None:
        message = f"request body exceeds {limit} bytes (the upload limit plus form overhead)"
        super().__init__(413, "too_large", message)


class RequestGuard:
    """Bearer-token check and body-size limit, both before the body is read."""

    def __init__(
        self, app: ASGIApp, settings: WhisperServiceSettings, metrics: ServiceMetrics
    ) -> None:
        self.app = app
        self.metrics = metrics
        token = settings.api_token
        self.token = token.get_secret_value().encode() if token is not None else None
        self.max_body = settings.max_upload_bytes + FORM_OVERHEAD_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (
            self.token is not None
            and scope["path"] not in OPEN_PATHS
            and not _has_token(scope, self.token)
        ):
            self.metrics.error("unauthorized")
            response = _error_response(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            self.metrics.error("too_large")
            message = f"request body is {declared} bytes; the limit is {self.max_body} bytes"
            await _error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # chunked upload, or a lying Content-Length
                raise UploadTooLargeError(self.max_body)
            return message

        await self.app(scope, counting_receive, send)


def _has_token(scope: Scope, token: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            bearer = scheme.lower() == b"bearer"
            return bearer and secrets.compare_digest(credentials.strip(), token)
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Every HTTPException (ours and the framework's 404/405/400) as `{"error": ...}`."""
    if isinstance(exc, ServiceError):
        reason = exc.reason
    else:
        reason = "invalid_request" if exc.status_code < 500 else "engine_error"
    request.app.state.service.metrics.error(reason)
    return _error_response(exc.status_code, str(exc.detail), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 validation errors as one readable sentence: `file: Field required`."""
    problems = []
    for error in exc.errors():
        parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "form")]
        location = ".".join(parts)
        problems.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
    request.app.state.service.metrics.error("invalid_request")
    return _error_response(422, "; ".join(problems))


async def _queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    """Backpressure: 429 with `Retry-After` (seconds), so clients wait instead of piling on."""
    request.app.state.service.metrics.error("overloaded")
    return _error_response(429, str(exc), {"Retry-After": str(exc.retry_after_s)})

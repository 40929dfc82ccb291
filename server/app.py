"""`build_app(settings, engine)`: the FastAPI app, its lifespan (engine thread) and error handlers; `serve()` runs it."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api
from .chat import OpenAIServingChat
from .engine import Engine
from .errors import EngineNotReady, ModelNotFound, PayloadTooLarge, QueueFull, RequestError, Unauthorized
from .metrics import Metrics
from .openapi import finalize
from .profiles import Profiles
from .protocol import ErrorInfo, ErrorResponse
from .serving import OpenAIServingCompletion, create_error_response
from .settings import ServerSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: Engine = app.state.engine
    engine.start()  # loads in the background; /health says 503 until it is ready
    try:
        yield
    finally:
        engine.stop()


def build_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(settings)
    metrics = Metrics(engine.model_name)
    engine.stats = metrics
    app = FastAPI(title="drllm", summary="OpenAI-compatible completions with dynamic layer routing",
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = OpenAIServingCompletion(engine)
    app.state.chat = OpenAIServingChat(engine, app.state.serving)
    app.state.profiles = Profiles(engine, settings.profiles)
    app.state.created = int(time.time())
    app.include_router(api.router)
    derived = app.openapi
    app.openapi = lambda: finalize(derived(), settings.api_key is not None)  # type: ignore[method-assign]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    for expected in (RequestError, Unauthorized, ModelNotFound, QueueFull, EngineNotReady):
        app.add_exception_handler(expected, _any_error)  # handled here, not re-raised and logged as a crash
    app.add_exception_handler(Exception, _any_error)
    # the last added runs first: JsonBodies, then CountCompletions (so it counts the 413s), then BodyLimit
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(CountCompletions, metrics=metrics)
    app.add_middleware(JsonBodies)
    return app


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field. The API key is checked first:
    a request without it gets 401 whatever its body (FastAPI validates the body before the dependencies)."""
    settings: ServerSettings = request.app.state.settings
    if settings.api_key is not None and request.url.path.startswith("/v1/"):
        try:
            api.require_api_key(settings, await api.bearer(request))
        except Unauthorized as e:
            return api.error_json(create_error_response(e))
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        param, msg = None, f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
        sent_as = request.scope.get("state", {}).get(JsonBodies.SENT_AS)
        if sent_as is not None:
            msg += f" (this API takes a JSON body, Content-Type: application/json; this one came as {sent_as!r})"
    else:
        param = loc[0] if loc else None
        msg = f"{'.'.join(loc)}: {msg}" if loc else msg
    return api.error_json(create_error_response(RequestError(msg, param)))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err = ErrorResponse(error=ErrorInfo(message=str(exc.detail), type=kind), status_code=exc.status_code,
                        headers=dict(exc.headers or {}))
    return api.error_json(err)


async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    return api.error_json(create_error_response(exc))


COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions")


class JsonBodies:
    """POST bodies are read as JSON whatever their Content-Type says (`curl -d` sends form encoding, some clients
    send none); a body that is not JSON then gets a 400 that names the Content-Type it came with."""

    SENT_AS = "drllm_sent_content_type"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            sent = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            media = sent.partition(";")[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
                scope.setdefault("state", {})[self.SENT_AS] = sent or "none"
        await self.app(scope, receive, send)


class BodyLimit:
    """A request body over `max_bytes` gets a 413 (OpenAI error envelope) before the app reads or parses it:
    at once when Content-Length says so, else as soon as the chunks received pass the limit. Bodies within
    the limit are passed on as received."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:  # buffer the body (FastAPI reads it whole anyway), counting as it comes
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, size)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        err = create_error_response(PayloadTooLarge(
            f"the request body ({size} bytes or more) exceeds the server's limit of {self.max_bytes} bytes "
            "(--max-request-bytes)"))
        await api.error_json(err)(scope, receive, send)


class CountCompletions:
    """Counts responses of the generation endpoints by status class (2xx/4xx/5xx), whatever produced them."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in COUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                if message["status"] != 499:  # client gone: no response was delivered
                    self.metrics.on_response(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.metrics.on_response(500)
            raise


def serve(settings: ServerSettings) -> int:
    """Run the server until interrupted. Returns 2 (with a message) when the model or routers fail to load."""
    import uvicorn

    logging.getLogger().setLevel(settings.log_level.upper())
    engine = Engine(settings)
    app = build_app(settings, engine)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, timeout_graceful_shutdown=5))

    def on_failure(e: BaseException) -> None:
        server.should_exit = True

    engine.on_failure = on_failure
    server.run()
    if engine.error is not None:
        print(f"drllm: error: cannot serve: {engine.error}", file=sys.stderr)
        return 2
    return 0

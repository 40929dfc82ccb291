"""The HTTP routes: thin wrappers that take their handler from `app.state` and turn results into responses."""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from .chat import OpenAIServingChat
from .chat_protocol import ChatCompletionRequest, ChatCompletionResponse
from .engine import Engine
from .errors import EngineNotReady, ModelNotFound, Unauthorized
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openapi import GENERATION_ERRORS, errors, sse
from .profiles import Profiles
from .protocol import CompletionRequest, CompletionResponse, ErrorResponse, Health, ModelCard, ModelList
from .serving import OpenAIServingCompletion, create_error_response, list_models
from .settings import ServerSettings

T = TypeVar("T")
router = APIRouter()


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _serving(request: Request) -> OpenAIServingCompletion:
    return request.app.state.serving


def _chat(request: Request) -> OpenAIServingChat:
    return request.app.state.chat


def _profiles(request: Request) -> Profiles:
    return request.app.state.profiles


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


EngineDep = Annotated[Engine, Depends(_engine)]
ServingDep = Annotated[OpenAIServingCompletion, Depends(_serving)]
ChatDep = Annotated[OpenAIServingChat, Depends(_chat)]
ProfilesDep = Annotated[Profiles, Depends(_profiles)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
SettingsDep = Annotated[ServerSettings, Depends(_settings)]


bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`, when the server has an API key")


def require_api_key(settings: SettingsDep,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    if settings.api_key is None:
        return
    given = credentials.credentials.strip() if credentials is not None else ""
    expected = settings.api_key.get_secret_value().encode()
    if not hmac.compare_digest(given.encode(), expected):  # constant time in the key's length
        raise Unauthorized("missing or invalid API key; send `Authorization: Bearer <key>`")


Authorized = [Depends(require_api_key)]


def error_json(err: ErrorResponse) -> JSONResponse:
    return JSONResponse(err.model_dump(), status_code=err.status_code, headers=err.headers)


@router.get("/health", response_model=Health, responses=errors(503))
async def health(engine: EngineDep) -> Response:
    try:
        engine.require_ready()
    except EngineNotReady as e:
        return error_json(create_error_response(e))
    return JSONResponse({"status": "ok"})


@router.get("/version")
async def version(engine: EngineDep) -> dict[str, object]:
    return {"version": importlib.metadata.version("drllm"), "model": engine.model_name,
            "state": engine.state.value, "routers": engine.settings.routers, "routers_loaded": engine.has_routers,
            "torch_threads": engine.torch_threads, "scheduler": engine.settings.scheduler}


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=Authorized, response_model=ModelList, responses=errors(401, 503))
async def show_models(engine: EngineDep, request: Request, profiles: ProfilesDep) -> Response:
    try:
        models = list_models(engine, request.app.state.created)
        models.data += profiles.cards(models.data[0])
        return JSONResponse(models.model_dump())
    except EngineNotReady as e:
        return error_json(create_error_response(e))


@router.get("/v1/models/{model:path}", dependencies=Authorized, response_model=ModelCard,
            responses=errors(401, 404, 503))
async def show_model(model: str, engine: EngineDep, request: Request, profiles: ProfilesDep) -> Response:
    """One entry of /v1/models (OpenAI's "retrieve model"); a profile is `<model>:<profile>`."""
    try:
        models = list_models(engine, request.app.state.created)
        cards = models.data + profiles.cards(models.data[0])
        for card in cards:
            if card.id == model:
                return JSONResponse(card.model_dump())
        names = ", ".join(repr(c.id) for c in cards)
        raise ModelNotFound(f"the model {model!r} does not exist; this server serves {names}")
    except (EngineNotReady, ModelNotFound) as e:
        return error_json(create_error_response(e))


@router.post("/v1/completions", dependencies=Authorized, response_model=CompletionResponse,
             responses={**sse("CompletionStreamResponse"), **errors(*GENERATION_ERRORS)})
async def create_completion(body: CompletionRequest, request: Request, serving: ServingDep,
                            profiles: ProfilesDep) -> Response:
    try:
        body = profiles.resolve(body)
    except Exception as e:  # noqa: BLE001 - mapped to a status
        return error_json(create_error_response(e))
    return await _respond(request, serving.create_completion(body))


@router.post("/v1/chat/completions", dependencies=Authorized, response_model=ChatCompletionResponse,
             responses={**sse("ChatCompletionChunk"), **errors(*GENERATION_ERRORS)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, chat: ChatDep,
                                 profiles: ProfilesDep) -> Response:
    try:
        body = profiles.resolve(body)
    except Exception as e:  # noqa: BLE001 - mapped to a status
        return error_json(create_error_response(e))
    return await _respond(request, chat.create_chat_completion(body))


async def _respond(request: Request, work: Awaitable[BaseModel | ErrorResponse | AsyncIterator[str]]) -> Response:
    """A handler's result as a response: an error with its status, an SSE stream, or JSON."""
    result = await _cancel_on_disconnect(request, work)
    if result is None:  # the client went away; nobody reads this
        return Response(status_code=499)
    if isinstance(result, ErrorResponse):
        return error_json(result)
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(result.model_dump())


async def _cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it (which aborts its sequences) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

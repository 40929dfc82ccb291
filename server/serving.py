"""Completions: request -> engine -> response (JSON or SSE chunks), and the one exception -> status mapper."""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel as PydanticModel

from routing.generation import GenerationRequest, Sequence, TokenLogprob
from routing.plan import LayerPlan, plan_summary

from .engine import Engine, RequestHandle
from .errors import EngineFailure, EngineNotReady, ModelNotFound, QueueFull, RequestError, Unauthorized
from .protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    RoutingInfo,
    UsageInfo,
)

log = logging.getLogger(__name__)


def create_error_response(exc: BaseException) -> ErrorResponse:
    """The single place that turns an exception into an OpenAI error and an HTTP status."""

    def err(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
            headers: dict[str, str] | None = None) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code),
                             status_code=status, headers=headers or {})

    match exc:
        case RequestError():
            return err(400, str(exc), "invalid_request_error", exc.param)
        case Unauthorized():
            return err(401, str(exc), "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        case ModelNotFound():
            return err(404, str(exc), "invalid_request_error", "model", "model_not_found")
        case QueueFull():
            return err(429, str(exc), "rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(exc.retry_after_s)})
        case EngineNotReady():
            return err(503, str(exc), "service_unavailable", code="model_not_ready", headers={"Retry-After": "5"})
        case ValueError():  # a bad request that reached the model side (routing raises plain ValueError)
            return err(400, str(exc), "invalid_request_error")
        case EngineFailure():
            return err(500, "the server failed while running this request", "server_error")
        case _:
            log.error("unexpected error", exc_info=exc)
            return err(500, "internal server error", "server_error")


@dataclass
class _Prompt:
    ids: list[int]
    text: str  # the prompt as text (echo)


class OpenAIServingCompletion:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._token_text: dict[int, str] = {}

    async def create_completion(self, request: CompletionRequest
                                ) -> CompletionResponse | ErrorResponse | AsyncIterator[str]:
        result = await self.complete(request)
        return sse_stream(result, request.include_usage) if isinstance(result, AsyncIterator) else result

    async def complete(self, request: CompletionRequest) -> CompletionResponse | ErrorResponse | ChunkStream:
        """Run one Completions request: the response, or (stream=true) its chunks as objects, ending with an
        ErrorResponse if the stream fails. The one generation path: Chat Completions reshapes what this returns."""
        try:
            prompts, reqs = self._prepare(request)
            handle = self.engine.submit(reqs)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            return create_error_response(e)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.engine.model_name, request, prompts)
        if request.stream:
            return self._stream(meta, handle)
        try:
            async for _ in handle.events():
                pass
        except Exception as e:  # noqa: BLE001
            return create_error_response(e)
        finally:
            self.engine.abort(handle)  # no-op unless cancelled (client gone)
        return self._response(meta, handle)

    # --- request -> engine ------------------------------------------------------------------------
    def _prepare(self, request: CompletionRequest) -> tuple[list[_Prompt], list[GenerationRequest]]:
        engine = self.engine
        model = engine.loaded  # EngineNotReady while loading
        if request.model not in (None, engine.model_name):
            raise ModelNotFound(f"the model {request.model!r} does not exist; this server serves "
                                f"{engine.model_name!r}")
        L = model.spec.n_layers
        plan = None
        if request.plan is not None:
            if len(request.plan) != L:
                raise RequestError(f"plan has {len(request.plan)} counts but the model has {L} layers", "plan")
            plan = LayerPlan(tuple(request.plan))
        self._check_budget(request, plan, L)
        prompts = self._prompts(request)
        if len(prompts) * request.n > engine.settings.max_queue:
            raise RequestError(f"{len(prompts)} prompts x n={request.n} exceeds the server's queue of "
                               f"{engine.settings.max_queue} sequences", "n")
        reqs = []
        for p in prompts:
            for i in range(request.n):
                params = request.to_sampling_params(seed_offset=i)
                if len(p.ids) + params.max_tokens > engine.max_context:
                    raise RequestError(f"prompt ({len(p.ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                       f"the model's context of {engine.max_context} tokens", "max_tokens")
                reqs.append(GenerationRequest(
                    p.ids, params, plan=plan, routing=request.routing, budget=request.budget,
                    prompt_logprobs=request.echo and request.logprobs is not None))
        return prompts, reqs

    def _check_budget(self, request: CompletionRequest, plan: LayerPlan | None, L: int) -> None:
        b = request.budget
        if b is None or request.routing == "full":
            return
        limit = max(1, math.floor(b * L + 1e-9))  # as routing.routers.apply_budget
        if plan is not None:
            if plan.executions > limit:
                raise RequestError(f"plan runs {plan.executions} blocks but budget {b} allows at most {limit}",
                                   "budget")
        elif not self.engine.has_routers and b < 1:
            raise RequestError(f"budget {b} < 1 needs routers, and this server runs without them; "
                               "send routing='full' or a budget >= 1", "budget")

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        p = request.prompt
        items: list[str | list[int]]
        if isinstance(p, str):
            items = [p]
        elif all(isinstance(x, int) for x in p):
            items = [p]  # type: ignore[list-item]
        else:
            items = list(p)  # type: ignore[arg-type]
        tok = self.engine.loaded.tokenizer
        vocab = self.engine.loaded.spec.vocab_size
        out = []
        for item in items:
            if isinstance(item, str):
                ids = list(tok(item)["input_ids"])  # type: ignore[operator]
                text = item
            else:
                bad = [t for t in item if not 0 <= t < vocab]
                if bad:
                    raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
                ids, text = list(item), self._detok(item) if request.echo else ""
            if not ids:
                raise RequestError("the prompt is empty (no tokens)", "prompt")
            out.append(_Prompt(ids, text))
        return out

    # --- engine -> response -----------------------------------------------------------------------
    def _response(self, meta: _Meta, handle: RequestHandle) -> CompletionResponse:
        choices = []
        for i, seq in enumerate(handle.seqs):
            prompt = meta.prompts[i // meta.request.n]
            text = (prompt.text if meta.request.echo else "") + seq.text
            lp = None
            if meta.request.logprobs is not None:
                entries = (seq.prompt_logprobs if meta.request.echo else []) + list(seq.logprobs)
                lp = self._logprobs(entries, prompt.ids if meta.request.echo else [], seq.generated, 0)
            choices.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=seq.finish_reason,
                                            routing=_routing(seq)))
        return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=choices,
                                  usage=_usage(meta, handle))

    async def _stream(self, meta: _Meta, handle: RequestHandle) -> ChunkStream:
        request = meta.request
        started = [False] * len(handle.seqs)
        n_tokens = [0] * len(handle.seqs)
        offsets = [0] * len(handle.seqs)
        try:
            try:
                async for i, ev in handle.events():
                    seq, prompt = ev.seq, meta.prompts[i // request.n]
                    text = ev.text_delta
                    p_ids: list[int] = []
                    entries: list[TokenLogprob | None] = []
                    if not started[i]:  # the first chunk of a choice carries the echoed prompt
                        started[i] = True
                        if request.echo:
                            text = prompt.text + text
                            if request.logprobs is not None:
                                p_ids, entries = list(prompt.ids), list(seq.prompt_logprobs)
                    g_ids: list[int] = []
                    if ev.token_id is not None:
                        n_tokens[i] += 1
                        g_ids = [ev.token_id]
                        entries.append(seq.logprobs[n_tokens[i] - 1] if request.logprobs is not None else None)
                    lp = None
                    if request.logprobs is not None:
                        lp = self._logprobs(entries, p_ids, g_ids, offsets[i])
                        offsets[i] += sum(len(t) for t in lp.tokens)
                    if not text and not (lp and lp.tokens) and not ev.finished:
                        continue
                    choice = CompletionChoice(index=i, text=text, logprobs=lp,
                                              finish_reason=seq.finish_reason if ev.finished else None,
                                              routing=_routing(seq) if ev.finished else None)
                    yield CompletionStreamResponse(id=meta.id, created=meta.created, model=meta.model,
                                                   choices=[choice])
                if request.include_usage:
                    yield CompletionStreamResponse(id=meta.id, created=meta.created, model=meta.model, choices=[],
                                                   usage=_usage(meta, handle),
                                                   routing=[_routing(s) for s in handle.seqs])
            except Exception as e:  # noqa: BLE001 - a failed stream ends with an error chunk
                yield create_error_response(e)
        finally:
            self.engine.abort(handle)  # client gone mid-stream: free the rows

    def _logprobs(self, entries: list[TokenLogprob | None], prompt_ids: list[int], gen_ids: list[int],
                  offset: int) -> CompletionLogProbs:
        """OpenAI logprobs for prompt tokens (entries may start with None) then generated tokens."""
        out = CompletionLogProbs()
        for tid, e in zip(prompt_ids + gen_ids, entries, strict=True):
            tok = self._detok([tid])
            out.tokens.append(tok)
            out.text_offset.append(offset)
            offset += len(tok)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(e.logprob)
            top = {self._detok([t]): lp for t, lp in e.top}
            top.setdefault(tok, e.logprob)
            out.top_logprobs.append(top)
        return out

    def _detok(self, ids: list[int]) -> str:
        if len(ids) == 1 and ids[0] in self._token_text:
            return self._token_text[ids[0]]
        text = self.engine.loaded.tokenizer.decode(ids)  # type: ignore[attr-defined]
        if len(ids) == 1:
            self._token_text[ids[0]] = text
        return text


@dataclass
class _Meta:
    id: str
    created: int
    model: str
    request: CompletionRequest
    prompts: list[_Prompt]


def _routing(seq: Sequence) -> RoutingInfo | None:
    if seq.plan is None:
        return None
    probs = None if seq.decisions is None else [[round(p, 4) for p in layer] for layer in seq.decisions]
    return RoutingInfo(**plan_summary(seq.plan), decision_probs=probs)  # type: ignore[arg-type]


def _usage(meta: _Meta, handle: RequestHandle) -> UsageInfo:
    prompt = sum(len(p.ids) for p in meta.prompts)  # each prompt once, however many choices (as OpenAI)
    completion = sum(len(s.generated) for s in handle.seqs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


ChunkStream = AsyncGenerator[CompletionStreamResponse | ErrorResponse, None]


async def sse_stream(chunks: AsyncGenerator[PydanticModel, None], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for a stream of chunk objects: one `data:` line each, then `data: [DONE]`.
    `usage: null` on every chunk only when the usage chunk was asked for (as OpenAI); `routing` only where set."""
    async with contextlib.aclosing(chunks):  # closing the events closes the chunks (aborts the request)
        async for chunk in chunks:
            drop = set()
            if getattr(chunk, "routing", True) is None:
                drop.add("routing")
            if getattr(chunk, "usage", True) is None and not include_usage:
                drop.add("usage")
            yield f"data: {chunk.model_dump_json(exclude=drop)}\n\n"
    yield "data: [DONE]\n\n"


def list_models(engine: Engine, created: int) -> ModelList:
    model = engine.loaded
    return ModelList(data=[ModelCard(id=engine.model_name, created=created, root=model.source,
                                     max_model_len=engine.max_context)])

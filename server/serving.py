"""Completions: request -> engine -> response (JSON or SSE chunks), and the one exception -> status mapper.

Serving turns the engine's immutable `SequenceOutput` values into OpenAI responses; it never reads a live
sequence, the tokenizer or the model (everything goes through `EngineClient`), so its formatting is tested
against a fake engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel as PydanticModel

from routing.generation import (
    ContextLengthError,
    GenerationRequest,
    RoutingReport,
    SequenceOutput,
    TokenLogprob,
)
from routing.plan import LayerPlan, budget_conflict, plan_summary

from .engine import EngineClient, RequestHandle
from .errors import (
    EngineFailure,
    EngineNotReady,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RequestError,
    Unauthorized,
)
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
        case ContextLengthError():  # OpenAI's code for it
            return err(400, str(exc), "invalid_request_error", exc.param, "context_length_exceeded")
        case PayloadTooLarge():
            return err(413, str(exc), "invalid_request_error", code="request_too_large")
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


@dataclass
class _Choice:
    """One choice, accumulated from its outputs."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    n_generated: int = 0
    finish_reason: str | None = None
    routing: RoutingReport | None = None

    def add(self, out: SequenceOutput) -> None:
        if out.error is not None:
            raise EngineFailure(out.error)
        self.text.append(out.text)
        self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.routing is not None:
            self.routing = out.routing
        self.n_generated = out.num_generated_tokens
        self.finish_reason = out.finish_reason


def _prompt_items(p: str | list) -> list[str | list[int]]:
    """The prompts of a Completions `prompt`: a string, a list of token ids, or a list of either."""
    if isinstance(p, str):
        return [p]
    if all(isinstance(x, int) for x in p):
        return [p]
    return list(p)


class OpenAIServingCompletion:
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    async def create_completion(self, request: CompletionRequest
                                ) -> CompletionResponse | ErrorResponse | AsyncIterator[str]:
        result = await self.complete(request)
        return sse_stream(result, request.include_usage) if isinstance(result, AsyncIterator) else result

    async def complete(self, request: CompletionRequest) -> CompletionResponse | ErrorResponse | ChunkStream:
        """Run one Completions request: the response, or (stream=true) its chunks as objects, ending with an
        ErrorResponse if the stream fails. The one generation path: Chat Completions reshapes what this returns."""
        try:
            # tokenizing a long prompt takes a while: off the event loop, so that other requests go on (the
            # fast tokenizers release the GIL while they encode)
            prompts, reqs = await asyncio.to_thread(self._prepare, request)
            handle = self.engine.submit(reqs)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            return create_error_response(e)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.engine.model_name, request, prompts)
        if request.stream:
            return self._stream(meta, handle)
        choices = [_Choice() for _ in handle.seq_ids]
        try:
            async for i, out in handle.outputs():
                choices[i].add(out)
        except Exception as e:  # noqa: BLE001
            return create_error_response(e)
        finally:
            self.engine.abort(handle)  # no-op unless cancelled (client gone) or failed
        return self._response(meta, choices)

    # --- request -> engine ------------------------------------------------------------------------
    def _prepare(self, request: CompletionRequest) -> tuple[list[_Prompt], list[GenerationRequest]]:
        engine = self.engine
        engine.require_ready()  # EngineNotReady while loading
        if request.model not in (None, engine.model_name):
            raise ModelNotFound(f"the model {request.model!r} does not exist; this server serves "
                                f"{engine.model_name!r}")
        L = engine.n_layers
        plan = None
        if request.plan is not None:
            if request.routing == "full":  # two explicit instructions that contradict each other
                raise RequestError("a plan runs its own per-layer counts, and routing='full' runs every block "
                                   "once: send one of them", "routing")
            plan = LayerPlan(tuple(request.plan))
            try:
                plan.check_length(L)
            except ValueError as e:
                raise RequestError(str(e), "plan") from e
        self._check_budget(request, plan, L)
        n_prompts = len(_prompt_items(request.prompt))
        if n_prompts * request.n > engine.max_queue:  # before tokenizing them
            raise RequestError(f"{n_prompts} prompts x n={request.n} exceeds the server's queue of "
                               f"{engine.max_queue} sequences", "n")
        prompts = self._prompts(request)
        reqs = []
        for p in prompts:
            for i in range(request.n):
                params = request.to_sampling_params(choice=i)
                reqs.append(GenerationRequest(
                    p.ids, params, plan=plan, routing=request.routing, budget=request.budget,
                    prompt_logprobs=request.echo and request.logprobs is not None))
        return prompts, reqs

    def _check_budget(self, request: CompletionRequest, plan: LayerPlan | None, L: int) -> None:
        b = request.budget
        if b is None or request.routing == "full":
            return
        why = budget_conflict(b, self.engine.has_routers, plan.executions if plan is not None else None, L)
        if why is not None:
            raise RequestError(why if plan is not None else f"{why}; send routing='full' or a budget >= 1", "budget")

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        vocab = self.engine.vocab_size
        out = []
        for item in _prompt_items(request.prompt):
            if isinstance(item, str):
                ids, text = self.engine.tokenize(item), item
            else:
                bad = [t for t in item if not 0 <= t < vocab]
                if bad:
                    raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
                ids, text = list(item), self.engine.detokenize(item) if request.echo else ""
            if not ids:
                raise RequestError("the prompt is empty (no tokens)", "prompt")
            out.append(_Prompt(ids, text))
        return out

    # --- engine outputs -> response ---------------------------------------------------------------
    def _response(self, meta: _Meta, choices: list[_Choice]) -> CompletionResponse:
        out = []
        echo = meta.request.echo
        for i, c in enumerate(choices):
            prompt = meta.prompts[i // meta.request.n]
            lp = None
            if meta.request.logprobs is not None:
                lp = _logprobs(c.prompt_logprobs if echo else (), c.logprobs, len(prompt.text) if echo else 0)
            out.append(CompletionChoice(index=i, text=(prompt.text if echo else "") + "".join(c.text), logprobs=lp,
                                        finish_reason=c.finish_reason, routing=_routing(c.routing)))
        return CompletionResponse(id=meta.id, created=meta.created, model=meta.model, choices=out,
                                  usage=_usage(meta, choices))

    async def _stream(self, meta: _Meta, handle: RequestHandle) -> ChunkStream:
        request = meta.request
        choices = [_Choice() for _ in handle.seq_ids]
        started = [False] * len(choices)
        try:
            try:
                async for i, out in handle.outputs():
                    c, prompt = choices[i], meta.prompts[i // request.n]
                    c.add(out)
                    text = out.text
                    prompt_lps: tuple[TokenLogprob, ...] = ()
                    if not started[i]:  # the first chunk of a choice carries the echoed prompt
                        started[i] = True
                        if request.echo:
                            text = prompt.text + text
                            prompt_lps = c.prompt_logprobs
                    lp = None
                    if request.logprobs is not None:
                        lp = _logprobs(prompt_lps, out.logprobs, len(prompt.text) if request.echo else 0)
                    if not text and not (lp and lp.tokens) and not out.finished:
                        continue
                    choice = CompletionChoice(index=i, text=text, logprobs=lp,
                                              finish_reason=out.finish_reason,
                                              routing=_routing(c.routing) if out.finished else None)
                    yield CompletionStreamResponse(id=meta.id, created=meta.created, model=meta.model,
                                                   choices=[choice])
                if request.include_usage:
                    yield CompletionStreamResponse(id=meta.id, created=meta.created, model=meta.model, choices=[],
                                                   usage=_usage(meta, choices),
                                                   routing=[_routing(c.routing) for c in choices])
            except Exception as e:  # noqa: BLE001 - a failed stream ends with an error chunk
                yield create_error_response(e)
        finally:
            self.engine.abort(handle)  # client gone mid-stream, or failed: free the rows


def _logprobs(prompt: tuple[TokenLogprob, ...] | list[TokenLogprob], generated: list[TokenLogprob] | tuple[TokenLogprob, ...],
              gen_offset: int) -> CompletionLogProbs:
    """OpenAI logprobs for prompt tokens (echo; the first has no logprob) then generated tokens. Offsets are
    the engine's (characters of the prompt text, of the generated text); generated ones are shifted by
    `gen_offset`, the length of the echoed prompt text."""
    out = CompletionLogProbs()
    for e, shift in [(e, 0) for e in prompt] + [(e, gen_offset) for e in generated]:
        out.tokens.append(e.token)
        out.text_offset.append(e.text_offset + shift)
        out.token_logprobs.append(e.logprob)
        if e.logprob is None:
            out.top_logprobs.append(None)
            continue
        top = {name: lp for _, name, lp in e.top}
        top.setdefault(e.token, e.logprob)
        out.top_logprobs.append(top)
    return out


@dataclass
class _Meta:
    id: str
    created: int
    model: str
    request: CompletionRequest
    prompts: list[_Prompt]


def _routing(report: RoutingReport | None) -> RoutingInfo | None:
    if report is None:
        return None
    probs = None if report.decision_probs is None else [[round(p, 4) for p in layer] for layer in report.decision_probs]
    return RoutingInfo(**plan_summary(report.plan), decision_probs=probs)  # type: ignore[arg-type]


def _usage(meta: _Meta, choices: list[_Choice]) -> UsageInfo:
    prompt = sum(len(p.ids) for p in meta.prompts)  # each prompt once, however many choices (as OpenAI)
    completion = sum(c.n_generated for c in choices)
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


def list_models(engine: EngineClient, created: int) -> ModelList:
    engine.require_ready()
    return ModelList(data=[ModelCard(id=engine.model_name, created=created, root=engine.model_source,
                                     max_model_len=engine.max_context)])

"""Chat Completions as a thin layer over the one Completions path.

The messages are rendered with the model's own chat template (`Engine.render_chat`), the chat request becomes
the equivalent Completions request on those token ids (`ChatCompletionRequest.to_completion`), the shared
path runs it (`OpenAIServingCompletion.complete`: validation, queueing, cancellation, errors, metrics), and
its result is reshaped here into the chat response or chunk stream (OpenAI's shapes, as vLLM serves them).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from .chat_protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprob,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
)
from .engine import Engine
from .protocol import CompletionLogProbs, CompletionResponse, CompletionStreamResponse, ErrorResponse
from .serving import ChunkStream, OpenAIServingCompletion, create_error_response, sse_stream


class OpenAIServingChat:
    def __init__(self, engine: Engine, completions: OpenAIServingCompletion) -> None:
        self.engine = engine
        self.completions = completions

    async def create_chat_completion(self, request: ChatCompletionRequest
                                     ) -> ChatCompletionResponse | ErrorResponse | AsyncIterator[str]:
        try:  # rendering tokenizes: off the event loop, as the Completions path does
            prompt_ids = await asyncio.to_thread(self.engine.render_chat, request.template_messages())
            completion = request.to_completion(prompt_ids, self.engine.max_context)
        except Exception as e:  # noqa: BLE001 - mapped to a status
            return create_error_response(e)
        result = await self.completions.complete(completion)
        if isinstance(result, ErrorResponse):
            if result.error.param == "prompt":  # the chat's prompt is its messages
                result.error.param = "messages"
            return result
        if isinstance(result, CompletionResponse):
            return _response(result, request)
        return sse_stream(_chunks(result, request), request.include_usage)


def _chat_id(completion_id: str) -> str:
    return "chatcmpl-" + (completion_id.removeprefix("cmpl-") or uuid.uuid4().hex)


def _response(r: CompletionResponse, request: ChatCompletionRequest) -> ChatCompletionResponse:
    choices = [ChatCompletionChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                    logprobs=chat_logprobs(c.logprobs, request.top_logprobs or 0),
                                    finish_reason=c.finish_reason, routing=c.routing) for c in r.choices]
    return ChatCompletionResponse(id=_chat_id(r.id), created=r.created, model=r.model, choices=choices,
                                  usage=r.usage)


async def _chunks(stream: ChunkStream, request: ChatCompletionRequest
                  ) -> AsyncGenerator[ChatCompletionChunk | ErrorResponse, None]:
    """Completions chunks -> chat chunks: each choice's role first (empty content), then content deltas, each
    choice's finish chunk (finish_reason and its routing report), the usage chunk if asked for."""
    async with contextlib.aclosing(stream):
        head: CompletionStreamResponse | ErrorResponse | None = await anext(stream, None)
        if isinstance(head, ErrorResponse):
            yield head
            return
        if head is None:
            return
        chat_id = _chat_id(head.id)

        def chunk(choices: list[ChatCompletionStreamChoice], c: CompletionStreamResponse) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=chat_id, created=c.created, model=c.model, choices=choices,
                                       usage=c.usage, routing=c.routing)

        for i in range(request.n):
            yield chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                        head)
        c: CompletionStreamResponse | ErrorResponse = head
        while True:
            if isinstance(c, ErrorResponse):
                yield c
            else:
                yield chunk([ChatCompletionStreamChoice(
                    index=x.index, delta=DeltaMessage(content=x.text or None), finish_reason=x.finish_reason,
                    logprobs=chat_logprobs(x.logprobs, request.top_logprobs or 0), routing=x.routing,
                ) for x in c.choices], c)
            nxt = await anext(stream, None)
            if nxt is None:
                return
            c = nxt


def chat_logprobs(lp: CompletionLogProbs | None, top: int) -> ChatChoiceLogprobs | None:
    """Completions logprobs (parallel lists, alternatives as a dict) -> the chat shape: per token its text,
    logprob, UTF-8 bytes and the `top` most likely alternatives, most likely first."""
    if lp is None:
        return None
    content = []
    for tok, logprob, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        if logprob is None:  # a prompt token without a logprob; the chat path never echoes the prompt
            continue
        best = sorted((alts or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append(ChatLogprob(token=tok, logprob=logprob, bytes=token_bytes(tok),
                                   top_logprobs=[TopLogprob(token=t, logprob=v, bytes=token_bytes(t))
                                                 for t, v in best]))
    return ChatChoiceLogprobs(content=content)


def token_bytes(token: str) -> list[int]:
    """The bytes of a token as shown in logprobs: its UTF-8 encoding, or, for a byte token that is not valid
    UTF-8 on its own and is shown as `bytes:\\xNN...` (vLLM's convention), those raw bytes."""
    if token.startswith("bytes:"):
        with contextlib.suppress(UnicodeDecodeError, UnicodeEncodeError):
            return list(token[6:].encode("ascii").decode("unicode_escape").encode("latin-1"))
    return list(token.encode("utf-8"))

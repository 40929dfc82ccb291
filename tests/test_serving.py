"""Serving's formatting (JSON, SSE streaming, echo, logprobs, n, usage, errors) against a fake engine that
replays scripted `SequenceOutput` values: no model, no tokenizer, milliseconds (as vLLM's entrypoint tests)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from routing.generation import (
    ContextLengthError,
    GenerationRequest,
    RoutingReport,
    SequenceOutput,
    TokenLogprob,
    check_context,
)
from routing.plan import LayerPlan
from server.engine import RequestHandle
from server.protocol import CompletionRequest, CompletionResponse, ErrorResponse
from server.serving import OpenAIServingCompletion

L = 4
PLAN = LayerPlan((1, 0, 2, 1))


def lp(token_id: int, token: str, logprob: float | None, offset: int) -> TokenLogprob:
    top = () if logprob is None else ((token_id, token, logprob), (99, "bytes:\\xff", logprob - 1))
    return TokenLogprob(token_id, token, logprob, offset, top)


class FakeEngine:
    """Each sequence produces the pieces of `script` one token at a time ("é" arrives as two byte tokens,
    the first with no text), then finishes with "length" (or "error" when `fail` is set)."""

    model_name = "fake"
    has_routers = False
    max_context = 64
    max_queue = 16
    n_layers = L
    vocab_size = 100
    model_source = "nowhere"

    def __init__(self, script: list[str], fail: bool = False) -> None:
        self.script, self.fail = script, fail
        self.submitted: list[GenerationRequest] = []
        self.aborted = 0

    def require_ready(self) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]

    def detokenize(self, ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)

    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        raise ValueError("no chat template")

    def submit(self, requests: list[GenerationRequest]) -> RequestHandle:
        for r in requests:
            check_context(len(r.prompt_ids), r.params.max_tokens, self.max_context)
        self.submitted += requests
        handle = RequestHandle(list(range(len(requests))), asyncio.get_running_loop())
        for i, r in enumerate(requests):
            for out in self._outputs(i, r):
                handle.loop.call_soon(handle.queue.put_nowait, (i, out))
        return handle

    def _outputs(self, seq_id: int, r: GenerationRequest) -> list[SequenceOutput]:
        n_prompt = len(r.prompt_ids)
        prompt_lps = tuple(lp(t, self.detokenize([t]), None if j == 0 else -0.5, j)
                           for j, t in enumerate(r.prompt_ids)) if r.prompt_logprobs else None
        outs, offset = [], 0
        for k, piece in enumerate(self.script):
            lps = (lp(k, piece or "bytes:\\xc3", -0.25 * (k + 1), offset),) if r.params.logprobs is not None else ()
            outs.append(SequenceOutput(seq_id, n_prompt, k + 1, (k,), piece, lps, prompt_lps if k == 0 else None,
                                       RoutingReport(PLAN, None) if k == 0 else None))
            offset += len(piece)
        last = outs[-1]
        end = "error" if self.fail else "length"
        outs[-1] = SequenceOutput(last.seq_id, n_prompt, last.num_generated_tokens, last.token_ids, last.text,
                                  last.logprobs, last.prompt_logprobs, last.routing, end,
                                  "boom" if self.fail else None)
        return outs

    def abort(self, handle: RequestHandle) -> None:
        self.aborted += 1


SCRIPT = ["Hi", "", "é", "!"]  # the second token holds its text (the first byte of "é")


def complete(engine: FakeEngine, **body: Any) -> CompletionResponse | ErrorResponse:
    async def run() -> Any:
        return await OpenAIServingCompletion(engine).create_completion(CompletionRequest(**body))  # type: ignore[arg-type]
    return asyncio.run(run())


def stream(engine: FakeEngine, **body: Any) -> list[Any]:
    async def run() -> list[str]:
        it = await OpenAIServingCompletion(engine).create_completion(CompletionRequest(stream=True, **body))
        return [c async for c in it]  # type: ignore[union-attr]
    lines = asyncio.run(run())
    assert all(ln.startswith("data: ") and ln.endswith("\n\n") for ln in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_plain_completion_with_n_and_two_prompts() -> None:
    eng = FakeEngine(SCRIPT)
    r = complete(eng, prompt=["ab", "cde"], n=2, max_tokens=4)
    assert isinstance(r, CompletionResponse)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hié!" and c.finish_reason == "length" and c.logprobs is None for c in r.choices)
    assert r.choices[0].routing is not None and r.choices[0].routing.plan == [1, 0, 2, 1]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 16)
    assert [len(q.prompt_ids) for q in eng.submitted] == [2, 2, 3, 3]
    assert eng.aborted == 1  # the handle is always released


def test_echo_logprobs_shift_generated_offsets_by_the_prompt_text() -> None:
    eng = FakeEngine(SCRIPT)
    r = complete(eng, prompt="xyz", max_tokens=4, echo=True, logprobs=1)
    assert isinstance(r, CompletionResponse)
    c = r.choices[0]
    assert c.text == "xyzHié!"
    lps = c.logprobs
    assert lps is not None
    assert lps.tokens == [eng.detokenize([t]) for t in eng.tokenize("xyz")] + ["Hi", "bytes:\\xc3", "é", "!"]
    assert lps.text_offset == [0, 1, 2, 3, 5, 5, 6]
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.top_logprobs[3] == {"Hi": -0.25, "bytes:\\xff": -1.25}


def test_stream_chunks_echo_logprobs_finish_and_usage() -> None:
    chunks = stream(FakeEngine(SCRIPT), prompt="ab", max_tokens=4, echo=True, logprobs=0,
                    stream_options={"include_usage": True})
    texts = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert texts == ["ab" + "Hi", "", "é", "!"]  # the held byte token still streams its logprobs
    first = chunks[0]["choices"][0]["logprobs"]
    assert first["text_offset"] == [0, 1, 2] and first["token_logprobs"][0] is None
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks[1:-1]] == [[4], [4], [5]]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert chunks[-2]["choices"][0]["routing"]["plan"] == [1, 0, 2, 1]
    assert "routing" not in chunks[0]["choices"][0] or chunks[0]["choices"][0]["routing"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])
    assert "".join(texts) == "abHié!"


def test_stream_without_logprobs_skips_empty_chunks() -> None:
    chunks = stream(FakeEngine(SCRIPT), prompt="ab", max_tokens=4, n=2)
    by_index: dict[int, list[str]] = {}
    for c in chunks:
        ch = c["choices"][0]
        by_index.setdefault(ch["index"], []).append(ch["text"])
        assert "usage" not in c
    assert by_index == {0: ["Hi", "é", "!"], 1: ["Hi", "é", "!"]}


def test_a_failed_sequence_is_500_or_an_error_chunk() -> None:
    r = complete(FakeEngine(SCRIPT, fail=True), prompt="ab", max_tokens=4)
    assert isinstance(r, ErrorResponse) and r.status_code == 500 and r.error.type == "server_error"
    chunks = stream(FakeEngine(SCRIPT, fail=True), prompt="ab", max_tokens=4)
    assert chunks[-1]["error"]["type"] == "server_error"


def test_context_rule_is_400_naming_max_tokens() -> None:
    r = complete(FakeEngine(SCRIPT), prompt="ab", max_tokens=63)
    assert isinstance(r, ErrorResponse) and r.status_code == 400 and r.error.param == "max_tokens"
    with pytest.raises(ContextLengthError):
        check_context(2, 63, 64)

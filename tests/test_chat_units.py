"""Chat Completions pieces without a model: request -> Completions request, logprobs shape, stream reshaping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from server.chat import _chunks, chat_logprobs, token_bytes
from server.chat_protocol import ChatCompletionRequest
from server.errors import EngineFailure
from server.profiles import Profile
from server.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionStreamResponse,
    ErrorResponse,
    UsageInfo,
)
from server.serving import create_error_response, sse_stream

MSG = [{"role": "user", "content": "hi"}]


def test_to_completion_copies_the_shared_fields() -> None:
    req = ChatCompletionRequest(messages=MSG, max_tokens=9, max_completion_tokens=3, temperature=0.5, top_k=4,
                                seed=7, stop=["x"], n=2, budget=0.5, routing="full", plan=[1, 0],
                                logprobs=True, top_logprobs=20, ignore_eos=True, min_tokens=1, user="u")
    c = req.to_completion([5, 6, 7], max_context=100)
    assert (c.prompt, c.max_tokens, c.temperature, c.top_k, c.seed, c.stop, c.n) == ([5, 6, 7], 3, 0.5, 4, 7, ["x"], 2)
    assert (c.budget, c.routing, c.plan, c.logprobs, c.ignore_eos, c.min_tokens, c.echo) == \
        (0.5, "full", [1, 0], 20, True, 1, False)
    p = c.to_sampling_params()
    assert (p.max_tokens, p.logprobs, p.seed) == (3, 20, 7)
    assert ChatCompletionRequest(messages=MSG, max_tokens=9).to_completion([1], 100).max_tokens == 9
    assert ChatCompletionRequest(messages=MSG).to_completion([1, 2], 100).max_tokens == 98  # the rest of the context
    assert ChatCompletionRequest(messages=MSG).to_completion([1], 100).logprobs is None
    assert ChatCompletionRequest(messages=MSG, logprobs=True).to_completion([1], 100).logprobs == 0


def test_template_messages() -> None:
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "d"},
                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]},
                                          {"role": "assistant", "content": ""}])
    assert req.template_messages() == [{"role": "system", "content": "d"}, {"role": "user", "content": "a\nb"},
                                       {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("body,field", [({"messages": []}, "messages"),
                                        ({"messages": [{"role": "user"}]}, "messages"),
                                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                                        ({"messages": MSG, "tools": [{"type": "function"}]}, "tools"),
                                        ({"messages": MSG, "tool_choice": "required"}, "tool_choice"),
                                        ({"messages": MSG, "response_format": {"type": "json_object"}},
                                         "response_format"),
                                        ({"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
                                        ({"messages": MSG, "seed": -2}, "seed"),
                                        ({"messages": MSG, "plan": [0, 0]}, "plan")])
def test_bad_chat_fields_name_themselves(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(**body)
    assert e.value.errors()[0]["loc"][0] == field


def test_token_bytes() -> None:
    assert token_bytes(" caf\u00e9") == [32, 99, 97, 102, 0xC3, 0xA9]
    assert token_bytes("bytes:\\xe2\\x80") == [0xE2, 0x80]  # vLLM's form for a byte token that is not UTF-8 alone
    assert token_bytes("bytes:") == []


def test_chat_logprobs_top_k_most_likely_first() -> None:
    lp = CompletionLogProbs(tokens=["a", "b"], token_logprobs=[-0.5, -3.0], text_offset=[0, 1],
                            top_logprobs=[{"x": -2.0, "a": -0.5, "y": -1.0}, {"c": -0.1, "d": -0.2, "b": -3.0}])
    out = chat_logprobs(lp, 2)
    assert out is not None and out.content is not None
    assert [(e.token, e.logprob) for e in out.content] == [("a", -0.5), ("b", -3.0)]
    assert [[(t.token, t.logprob) for t in e.top_logprobs] for e in out.content] == \
        [[("a", -0.5), ("y", -1.0)], [("c", -0.1), ("d", -0.2)]]
    assert chat_logprobs(None, 2) is None


def _chunk(i: int, text: str, finish: str | None = None) -> CompletionStreamResponse:
    return CompletionStreamResponse(id="cmpl-abc", created=1, model="m",
                                    choices=[CompletionChoice(index=i, text=text, finish_reason=finish)])


async def _from(items: list) -> AsyncIterator:
    for x in items:
        yield x


def _sse(items: list, n: int = 1, include_usage: bool = False) -> list[dict | str]:
    req = ChatCompletionRequest(messages=MSG, n=n, stream=True)

    async def collect() -> list[str]:
        return [x async for x in sse_stream(_chunks(_from(items), req), include_usage)]

    lines = asyncio.run(collect())
    return [json.loads(x.removeprefix("data: ")) if "[DONE]" not in x else "[DONE]" for x in lines]


def test_stream_reshaping_roles_first_then_deltas_then_finish() -> None:
    usage = CompletionStreamResponse(id="cmpl-abc", created=1, model="m", choices=[], usage=UsageInfo(
        prompt_tokens=1, completion_tokens=2, total_tokens=3), routing=[None, None])
    out = _sse([_chunk(1, "x"), _chunk(0, "y"), _chunk(0, "", "stop"), _chunk(1, "z", "length"), usage], n=2,
               include_usage=True)
    assert [c["choices"][0]["delta"] for c in out[:2]] == [{"role": "assistant", "content": ""}] * 2  # type: ignore[index]
    assert [c["choices"][0]["index"] for c in out[:5]] == [0, 1, 1, 0, 0]  # type: ignore[index]
    assert [c["choices"][0]["delta"] for c in out[2:6]] == [{"content": "x"}, {"content": "y"}, {}, {"content": "z"}]  # type: ignore[index]
    assert [c["choices"][0]["finish_reason"] for c in out[2:6]] == [None, None, "stop", "length"]  # type: ignore[index]
    assert out[6]["choices"] == [] and out[6]["usage"]["total_tokens"] == 3  # type: ignore[index]
    assert out[-1] == "[DONE]"
    assert {c["id"] for c in out[:-1]} == {"chatcmpl-abc"}  # type: ignore[index]
    assert all(c["object"] == "chat.completion.chunk" for c in out[:-1])  # type: ignore[index]


def test_stream_errors_end_with_an_error_chunk_then_done() -> None:
    err = create_error_response(EngineFailure("x"))
    assert _sse([err]) == [{"error": err.model_dump()["error"]}, "[DONE]"]
    out = _sse([_chunk(0, "a"), err])
    assert [type(x) for x in out] == [dict, dict, dict, str]
    assert out[2] == {"error": err.model_dump()["error"]} and isinstance(err, ErrorResponse)


# --- routing profiles -------------------------------------------------------------------------------------
def test_profile_specs() -> None:
    assert Profile.parse("full=full") == Profile("full", "full", None)
    assert Profile.parse(" eco = budget:0.75 ") == Profile("eco", "auto", 0.75)
    assert Profile.parse("r=auto").spec == "auto" and Profile.parse("b=budget:2").spec == "budget:2"
    for bad in ("full", "=full", "a:b=full", "x=half", "x=budget:0", "x=budget:2.5", "x=budget:abc", "x=budget"):
        with pytest.raises(ValueError, match="profile"):
            Profile.parse(bad)


def test_profile_fills_in_only_for_requests_that_do_not_route_themselves() -> None:
    eco = Profile("eco", "auto", 0.8)
    r = eco.apply(CompletionRequest(model="m:eco", prompt="x"))
    assert (r.model, r.routing, r.budget) == (None, "auto", 0.8)
    assert Profile("f", "full").apply(CompletionRequest(model="m:f", prompt="x")).routing == "full"
    for own in ({"budget": 0.5}, {"routing": "auto"}, {"plan": [1, 1]}):
        r = Profile("f", "full").apply(CompletionRequest(model="m:f", prompt="x", **own))
        assert r.routing == "auto" and r.budget == own.get("budget") and r.model is None


def test_profile_settings(monkeypatch) -> None:
    from cli.main import build_parser
    from cli.serve import settings_from_args
    from server.settings import ServerSettings

    def args(*argv: str):
        return build_parser().parse_args(["serve", *argv])

    monkeypatch.delenv("DRLLM_PROFILES", raising=False)
    assert settings_from_args(args()).profiles == ["full=full", "eco=budget:0.8"]
    s = settings_from_args(args("--profile", "a=full", "--profile", "b=budget:0.5"))
    assert s.profiles == ["a=full", "b=budget:0.5"]
    monkeypatch.setenv("DRLLM_PROFILES", "x=auto, y=budget:1.5")
    assert settings_from_args(args()).profiles == ["x=auto", "y=budget:1.5"]
    monkeypatch.setenv("DRLLM_PROFILES", "")
    assert settings_from_args(args()).profiles == []
    for bad in (["a=full", "a=auto"], ["a=sometimes"]):
        with pytest.raises(ValidationError):
            ServerSettings(profiles=bad)

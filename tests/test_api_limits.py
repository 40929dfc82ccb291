"""Regressions from a newcomer's session against the HTTP API (tiny random model): a big body or a slow
tokenization must not hold up other requests, errors blame the right field, contradicting extension fields
are refused, and the API key is checked before the body."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from toytok import ChatToyTokenizer, toy_model

from server.app import build_app
from server.engine import PROMPT_CHARS_SLACK, Engine, prompt_char_bound
from server.settings import ServerSettings

LIMIT = 4096


def _wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    threads = torch.get_num_threads()
    s = ServerSettings(routers="none", max_batch_size=4, torch_threads=1, max_request_bytes=LIMIT)
    model = toy_model()
    model.tokenizer = ChatToyTokenizer()
    with TestClient(build_app(s, Engine(s, model=model))) as client:
        _wait_ready(client)
        yield client
    torch.set_num_threads(threads)


def _is_envelope(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def _count_4xx(api: TestClient) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(api.get("/metrics").text) for s in f.samples
               if s.name == "drllm_requests_total" and s.labels.get("status_class") == "4xx")


def test_a_body_over_the_limit_is_413_before_it_is_parsed(api: TestClient) -> None:
    before = _count_4xx(api)
    big = {"prompt": "a" * (2 * LIMIT), "max_tokens": 1}
    err = _is_envelope(api.post("/v1/completions", json=big), 413, "request_too_large")
    assert str(LIMIT) in err["message"]
    _is_envelope(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 2 * LIMIT}]}),
                 413, "request_too_large")
    # without Content-Length (chunked): refused once the received chunks pass the limit
    chunks = (b'{"prompt": "' + b"a" * 1000 + (b'"}' if i == 9 else b"") for i in range(10))
    _is_envelope(api.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"}), 413)
    assert api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1}).status_code == 200
    assert _count_4xx(api) == before + 3  # counted like any other refused request


def test_a_chunked_body_within_the_limit_reaches_the_app_whole(api: TestClient) -> None:
    chunks = (part for part in (b'{"prompt": "a', b"bc", b'", "max_tokens": 2, "temperature": 0}'))
    r = api.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == api.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 2, "temperature": 0}).json()["usage"]["prompt_tokens"]


def test_a_slow_tokenization_does_not_hold_up_other_requests() -> None:
    # regression: a 30 MB prompt was tokenized on the event loop, and /health waited 28 s behind it
    s = ServerSettings(routers="none", max_batch_size=4, torch_threads=1)
    engine = Engine(s, model=toy_model())
    app = build_app(s, engine)
    slow_started = threading.Event()
    tokenized_at: list[float] = []
    fast_tokenize = engine.tokenize

    def slow_tokenize(text: str) -> list[int]:
        if text.startswith("slow"):
            slow_started.set()
            time.sleep(1.0)  # holds whichever thread runs it, as a long prompt would
            tokenized_at.append(time.monotonic())
        return fast_tokenize(text)

    engine.tokenize = slow_tokenize  # type: ignore[method-assign]

    async def scenario() -> float:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                while (await c.get("/health")).status_code != 200:
                    await asyncio.sleep(0.02)
                slow = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "slow prompt", "max_tokens": 1}))
                while not slow_started.is_set():
                    await asyncio.sleep(0.005)
                assert (await c.get("/health")).status_code == 200
                answered_at = time.monotonic()
                assert (await slow).status_code == 200
                return answered_at

    threads = torch.get_num_threads()
    try:
        answered_at = asyncio.run(scenario())
    finally:
        torch.set_num_threads(threads)
    assert answered_at < tokenized_at[0]  # /health was answered while the tokenization still ran


def test_context_overflow_blames_the_prompt_or_max_tokens(api: TestClient) -> None:
    ctx = api.get("/v1/models").json()["data"][0]["max_model_len"]
    err = _is_envelope(api.post("/v1/completions", json={"prompt": [5] * (ctx + 3), "max_tokens": 0}), 400,
                       "context_length_exceeded", "prompt")
    assert "max_tokens" not in err["message"]
    err = _is_envelope(api.post("/v1/completions", json={"prompt": [5] * (ctx - 2), "max_tokens": 5}), 400,
                       "context_length_exceeded", "max_tokens")
    # chat without max_tokens: the messages are too long, not a max_tokens of 0 nobody sent
    err = _is_envelope(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "b" * (ctx + 5)}]}),
                       400, "context_length_exceeded", "messages")
    assert "max_tokens (0)" not in err["message"]


def test_a_plan_with_routing_full_is_a_contradiction(api: TestClient) -> None:
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1, "plan": [1, 0] * 3, "routing": "full"})
    _is_envelope(r, 400, param="routing")
    r = api.post("/v1/completions", json={"prompt": "ab", "max_tokens": 1, "plan": [1, 0] * 3, "temperature": 0})
    assert r.json()["choices"][0]["routing"]["layers_executed"] == 3


def test_retrieve_one_model(api: TestClient) -> None:
    listed = api.get("/v1/models").json()["data"]
    for card in listed:  # the served model and each routing profile
        r = api.get(f"/v1/models/{card['id']}")
        assert r.status_code == 200 and r.json() == card
    _is_envelope(api.get("/v1/models/no-such-model"), 404, "model_not_found")


def test_the_api_key_is_checked_before_the_body() -> None:
    s = ServerSettings(routers="none", max_batch_size=4, torch_threads=1, api_key="k")
    threads = torch.get_num_threads()
    with TestClient(build_app(s, Engine(s, model=toy_model()))) as c:
        _wait_ready(c)
        bad = '{"prompt":'
        _is_envelope(c.post("/v1/completions", content=bad, headers={"Content-Type": "application/json"}), 401,
                     "invalid_api_key")
        _is_envelope(c.post("/v1/completions", json={"max_tokens": "x"}), 401)
        ok = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        _is_envelope(c.post("/v1/completions", content=bad, headers=ok), 400)  # with the key: the body's error
        assert c.get("/v1/models/" + c.get("/v1/models", headers=ok).json()["data"][0]["id"]).status_code == 401
    torch.set_num_threads(threads)


def test_prompt_char_bound() -> None:
    model = toy_model()  # one character per token, a 512-token context
    assert prompt_char_bound(model.tokenizer, model.spec.vocab_size, 512) == PROMPT_CHARS_SLACK * 512 * 1

    class NoDecode:
        def decode(self, ids: list[int]) -> str:
            raise KeyError(ids[0])

    assert prompt_char_bound(NoDecode(), 10, 512) is None  # no bound rather than a wrong one


def test_a_prompt_far_longer_than_the_context_is_refused_before_tokenizing(api: TestClient) -> None:
    engine = api.app.state.engine  # type: ignore[attr-defined]
    bound = engine.max_prompt_chars
    assert bound == PROMPT_CHARS_SLACK * engine.max_context  # the toy tokenizer: one character per token
    seen: list[int] = []
    tok = engine.model.tokenizer
    original = type(tok).__call__

    def counting(self: object, text: str, *a: object, **kw: object) -> object:
        seen.append(len(text))
        return original(self, text, *a, **kw)

    type(tok).__call__ = counting  # type: ignore[method-assign]
    try:
        err = _is_envelope(api.post("/v1/completions", json={"prompt": "a" * (bound + 1), "max_tokens": 1}), 400,
                           "context_length_exceeded", "prompt")
        assert "characters" in err["message"] and bound + 1 not in seen  # never tokenized
        _is_envelope(api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * (bound + 1)}]}),
                     400, "context_length_exceeded", "messages")
        # at the bound the text is tokenized, and the context rule decides
        _is_envelope(api.post("/v1/completions", json={"prompt": "a" * bound, "max_tokens": 1}), 400,
                     "context_length_exceeded", "prompt")
        assert bound in seen
    finally:
        type(tok).__call__ = original  # type: ignore[method-assign]

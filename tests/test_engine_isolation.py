"""Regression tests for the engine bugs of issue 10, over real HTTP with the default model: every degenerate
request runs beside a greedy request that must still return 200 with its normal text; seeds use 64 bits;
min_tokens holds off stop strings; byte-level tokens get exact offsets and distinct top_logprobs keys;
/metrics gauges are right after failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from live import LiveServer, run_server

from routing.model import BaseModel
from server.app import build_app
from server.engine import Engine
from server.settings import ServerSettings

pytestmark = pytest.mark.slow

GREEDY = {"prompt": "The capital of France is", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
DEGENERATE = [  # each one gave 500 to itself and to every request in its step
    {"prompt": "Hi", "max_tokens": 1, "temperature": 1e-38},
    {"prompt": "Hi", "max_tokens": 3, "top_p": 1e-300},
    {"prompt": "Hi", "max_tokens": 3, "temperature": 1, "repetition_penalty": 1e-40},
    {"prompt": "Hi", "max_tokens": 3, "temperature": 1e-40, "top_k": 1},
    {"prompt": "hello", "repetition_penalty": 5e-324},  # found by schemathesis
    {"prompt": "Hi", "max_tokens": 3, "temperature": 2, "repetition_penalty": 1e300, "min_p": 1},
]


@pytest.fixture(scope="module")
def live(default_model: BaseModel) -> Iterator[LiveServer]:
    threads = torch.get_num_threads()
    s = ServerSettings(routers="none", max_batch_size=8, max_queue=64)
    yield from run_server(build_app(s, Engine(s, model=default_model)))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def greedy_text(live: LiveServer) -> str:
    return post(live, GREEDY).json()["choices"][0]["text"]


def post(srv: LiveServer, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)


def gauges(srv: LiveServer) -> tuple[float, float]:
    text = httpx.get(srv.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        for name in ("drllm_num_requests_running", "drllm_num_requests_waiting"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["drllm_num_requests_running"], values["drllm_num_requests_waiting"]


async def together(srv: LiveServer, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
        return list(await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies)))


@pytest.mark.parametrize("body", DEGENERATE, ids=[json.dumps(b) for b in DEGENERATE])
def test_degenerate_sampling_beside_a_greedy_request(live: LiveServer, greedy_text: str, body: dict) -> None:
    greedy, bad = asyncio.run(together(live, [GREEDY, body]))
    assert greedy.status_code == 200 and greedy.json()["choices"][0]["text"] == greedy_text
    assert bad.status_code == 200, bad.text
    assert bad.json()["usage"]["completion_tokens"] >= 1


def test_non_finite_parameter_is_400_and_harms_nobody(live: LiveServer, greedy_text: str) -> None:
    body = '{"prompt": "Hi", "max_tokens": 2, "repetition_penalty": Infinity}'  # Python's JSON accepts it
    greedy = post(live, GREEDY)
    r = httpx.post(live.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "repetition_penalty" in r.text
    assert greedy.json()["choices"][0]["text"] == greedy_text


def test_load_with_degenerate_requests_loses_nothing_and_gauges_return_to_zero(live: LiveServer,
                                                                               greedy_text: str) -> None:
    bodies = [dict(DEGENERATE[i % len(DEGENERATE)]) if i % 4 == 0 else GREEDY for i in range(24)]
    out = asyncio.run(together(live, bodies))
    assert [r.status_code for r in out] == [200] * len(out)
    assert all(r.json()["choices"][0]["text"] == greedy_text for r, b in zip(out, bodies, strict=True) if b is GREEDY)
    deadline = time.monotonic() + 10
    while gauges(live) != (0, 0):
        assert time.monotonic() < deadline, gauges(live)
        time.sleep(0.05)


def test_gauges_are_zero_after_an_engine_failure(live: LiveServer) -> None:
    engine: Engine = live.app.state.engine  # type: ignore[attr-defined]
    gen = engine._gen
    assert gen is not None
    real_step, calls = gen.step, []

    def failing_step() -> list:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step()

    gen.step = failing_step  # type: ignore[method-assign]
    out = asyncio.run(together(live, [{**GREEDY, "max_tokens": 30}] * 3))
    assert {r.status_code for r in out} == {500}
    assert gauges(live) == (0, 0)  # no new request needed to correct them


def test_seeds_use_all_64_bits(live: LiveServer) -> None:
    body = {"prompt": "My favourite animal is", "max_tokens": 12, "temperature": 1, "ignore_eos": True}
    texts = [post(live, {**body, "seed": s}).json()["choices"][0]["text"] for s in (1, 4294967297, 1099511627777)]
    assert len(set(texts)) == 3, texts
    assert post(live, {**body, "seed": 4294967297}).json()["choices"][0]["text"] == texts[1]


def test_min_tokens_holds_off_stop_strings(live: LiveServer) -> None:
    # the case used ","; this model's greedy text is " Paris.\n\nThe answer is: 201", so "." it is
    body = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "stop": ["."]}
    early = post(live, body).json()
    assert early["usage"]["completion_tokens"] == 2 and early["choices"][0]["finish_reason"] == "stop"
    held = post(live, {**body, "min_tokens": 6}).json()
    assert held["usage"]["completion_tokens"] >= 6
    assert held["choices"][0]["text"].startswith(early["choices"][0]["text"])


def test_emoji_prompt_echo_offsets_count_characters(live: LiveServer) -> None:
    text = "Hello 😀 world"
    r = post(live, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}).json()["choices"][0]
    lp = r["logprobs"]
    assert r["text"] == text
    assert lp["tokens"] == ["Hello", "bytes:\\x20\\xf0\\x9f\\x98", "bytes:\\x80", " world"]
    assert lp["text_offset"] == [0, 5, 6, 7] and text[7:] == " world"


def test_top_logprobs_never_merge_byte_tokens(live: LiveServer) -> None:
    body = {"prompt": "Emoji only: 😀😃😄😁😆😅", "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 5,
            "ignore_eos": True}
    r = post(live, body).json()["choices"][0]
    lp = r["logprobs"]
    assert any(t.startswith("bytes:") for t in lp["tokens"])
    for tok, chosen, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert len(top) >= 5  # five distinct alternatives (plus the chosen token when it is not among them)
        assert top[tok] == pytest.approx(chosen, abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(r["text"])


def test_a_long_prompt_is_chunk_prefilled_and_gives_the_same_text(live: LiveServer, default_model: BaseModel,
                                                                    greedy_text: str) -> None:
    from routing.generation import BatchGenerator, GenerationRequest
    from routing.sampling import SamplingParams

    engine: Engine = live.app.state.engine  # type: ignore[attr-defined]
    assert engine._gen is not None and engine._gen.long_prompt is not None
    ids = default_model.tokenizer(" ".join(f"fact {i}: water is wet." for i in range(40)))["input_ids"]  # type: ignore[operator]
    assert len(ids) > engine._gen.long_prompt
    gen = BatchGenerator(default_model, max_batch=1)  # one unchunked prefill
    ref = gen.submit(GenerationRequest(list(ids), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    gen.run_to_completion()
    long, greedy = asyncio.run(together(live, [{"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                "ignore_eos": True}, GREEDY]))
    assert long.json()["choices"][0]["text"] == ref.text
    assert greedy.json()["choices"][0]["text"] == greedy_text

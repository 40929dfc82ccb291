"""Chat Completions over real HTTP with the default model on CPU, through the official `openai` client.

`live`: no routers (fixed plans only); `routed`: decisive random routers, for budgets; `toy`: a tiny random
model whose tokenizer has no chat template.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from live import LiveServer, run_server
from openai import OpenAI
from tiny import random_routers
from toytok import toy_model

from routing.model import BaseModel
from routing.routers import save_routers
from routing.sampling import choice_seed
from server.app import build_app
from server.engine import Engine
from server.settings import ServerSettings

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
L = 30


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(default_model: BaseModel) -> Iterator[LiveServer]:
    s = ServerSettings(routers="none", max_batch_size=8, api_key="sekret")
    yield from run_server(build_app(s, Engine(s, model=default_model)))


@pytest.fixture(scope="module")
def routed(default_model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ck = save_routers(tmp_path_factory.mktemp("routers") / "random", random_routers(default_model, 0), default_model)
    s = ServerSettings(routers=str(ck), max_batch_size=8)
    yield from run_server(build_app(s, Engine(s, model=default_model)))


@pytest.fixture(scope="module")
def client(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key="sekret", max_retries=0)


AUTH = {"Authorization": "Bearer sekret"}


def chat(srv: LiveServer, body: dict) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def completion(srv: LiveServer, body: dict) -> dict:
    r = httpx.post(srv.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def template_ids(model: BaseModel, messages: list[dict]) -> list[int]:
    enc = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True,  # type: ignore[attr-defined]
                                              return_dict=True)
    return list(enc["input_ids"])


def test_rendered_prompt_is_the_models_template(live: LiveServer, default_model: BaseModel) -> None:
    engine: Engine = live.app.state.engine  # type: ignore[attr-defined]
    ids = engine.render_chat(MESSAGES)
    assert ids == template_ids(default_model, MESSAGES)
    # the default model's template adds its default system prompt, which a hand-built prompt tends to miss
    assert "You are a helpful AI assistant" in default_model.tokenizer.decode(ids)  # type: ignore[attr-defined]
    opener = default_model.tokenizer("<|im_start|>assistant\n")["input_ids"]  # type: ignore[operator]
    assert ids[-len(opener):] == opener


def test_chat_equals_hand_templated_completion(client: OpenAI, live: LiveServer, default_model: BaseModel) -> None:
    r = client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=12, temperature=0)
    ids = template_ids(default_model, MESSAGES)
    text = default_model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,  # type: ignore[attr-defined]
                                                       tokenize=False)
    by_text = completion(live, {"prompt": text, "max_tokens": 12, "temperature": 0})
    by_ids = completion(live, {"prompt": ids, "max_tokens": 12, "temperature": 0})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.message.content == by_text["choices"][0]["text"] == by_ids["choices"][0]["text"]
    assert c.finish_reason == by_ids["choices"][0]["finish_reason"]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == default_model.name
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == by_ids["usage"]["completion_tokens"]
    routing = c.model_extra["routing"]  # type: ignore[index]
    assert routing["plan"] == [1] * L and routing["layers_executed"] == L


def test_text_parts_and_developer_role_render_like_strings(live: LiveServer, default_model: BaseModel) -> None:
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a\ncolour."}]
    a = chat(live, {"messages": parts, "max_tokens": 6, "temperature": 0}).json()
    b = chat(live, {"messages": plain, "max_tokens": 6, "temperature": 0}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["usage"]["prompt_tokens"] == len(template_ids(default_model, plain))


def test_stream_role_first_then_content_finish_usage_done(client: OpenAI, live: LiveServer,
                                                          default_model: BaseModel) -> None:
    whole = client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == whole.choices[0].message.content
    finish = chunks[-2].choices[0]
    assert finish.finish_reason == whole.choices[0].finish_reason
    assert finish.model_extra["routing"]["plan"] == [1] * L  # type: ignore[index]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    assert all(c.usage is None for c in chunks[:-1])
    # the raw stream: SSE lines ending with [DONE]; without include_usage no usage key at all
    with httpx.stream("POST", live.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line.removeprefix("data: ")) for line in lines[:-1])


def test_n_choices_with_seed(client: OpenAI, default_model: BaseModel) -> None:
    kw = {"model": default_model.name, "messages": MESSAGES, "max_tokens": 4, "temperature": 1.0}
    both = client.chat.completions.create(n=2, seed=11, **kw)  # type: ignore[call-overload]
    assert [c.index for c in both.choices] == [0, 1]
    first = client.chat.completions.create(seed=11, **kw)  # type: ignore[call-overload]
    second = client.chat.completions.create(seed=choice_seed(11, 1), **kw)  # type: ignore[call-overload]
    assert [c.message.content for c in both.choices] == [first.choices[0].message.content,
                                                         second.choices[0].message.content]
    streamed = list(client.chat.completions.create(n=2, seed=11, stream=True, **kw))  # type: ignore[call-overload]
    assert [c.choices[0].index for c in streamed[:2]] == [0, 1]  # each choice's role chunk first
    assert all(c.choices[0].delta.role == "assistant" for c in streamed[:2])
    for i, choice in enumerate(both.choices):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
        assert text == choice.message.content


def test_logprobs_in_the_chat_shape(client: OpenAI, live: LiveServer, default_model: BaseModel) -> None:
    r = client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    ref = completion(live, {"prompt": template_ids(default_model, MESSAGES), "max_tokens": 6, "temperature": 0,
                            "logprobs": 3})["choices"][0]["logprobs"]
    assert content is not None and [e.token for e in content] == ref["tokens"]
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e, lp in zip(content, ref["token_logprobs"], strict=True):
        assert e.logprob == pytest.approx(lp, abs=1e-6)
        assert e.bytes == list(e.token.encode("utf-8"))
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in e.top_logprobs)
    zero = client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                          max_tokens=2, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in zero.choices[0].logprobs.content] == [[], []]  # type: ignore[union-attr]
    plain = client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    streamed = list(client.chat.completions.create(model=default_model.name, messages=MESSAGES,  # type: ignore[arg-type]
                                                   max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                                   stream=True))
    tokens = [e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert tokens == ref["tokens"]


def test_budget_and_routing_extras(routed: LiveServer, default_model: BaseModel) -> None:
    client = OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": default_model.name, "messages": MESSAGES, "max_completion_tokens": 4, "temperature": 0}
    r = client.chat.completions.create(extra_body={"budget": 0.8}, **kw)  # type: ignore[call-overload]
    routing = r.choices[0].model_extra["routing"]  # type: ignore[index]
    assert routing["layers_executed"] <= int(0.8 * L) and len(routing["decision_probs"]) == L
    assert r.usage is not None and r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
    full = client.chat.completions.create(extra_body={"routing": "full"}, **kw)  # type: ignore[call-overload]
    assert full.choices[0].model_extra["routing"]["plan"] == [1] * L  # type: ignore[index]
    plan = [1] * 15 + [0] * 15
    fixed = client.chat.completions.create(extra_body={"plan": plan, "ignore_eos": True, "min_tokens": 4,
                                                       "top_k": 5, "repetition_penalty": 1.1},
                                           **kw)  # type: ignore[call-overload]
    assert fixed.choices[0].model_extra["routing"]["plan"] == plan  # type: ignore[index]
    assert fixed.usage is not None and fixed.usage.completion_tokens == 4


def test_max_completion_tokens_wins_and_default_fills_the_context(live: LiveServer) -> None:
    r = chat(live, {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 3, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3
    # without a limit the answer may use the rest of the context (as vLLM); greedy SmolLM ends its turn
    r = chat(live, {"messages": MESSAGES, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"


UNSUPPORTED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"logit_bias": {"1": 2.0}}, "logit_bias"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 3}, "top_logprobs"),  # needs logprobs=true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"max_completion_tokens": 9000}, "max_tokens"),  # beyond the context (the shared check names max_tokens)
    ({"plan": [0] * L}, "plan"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("extra,param", UNSUPPORTED, ids=[f"{p}-{i}" for i, (_, p) in enumerate(UNSUPPORTED)])
def test_unsupported_or_bad_fields_are_400_naming_them(live: LiveServer, extra: dict, param: str) -> None:
    r = chat(live, {"messages": MESSAGES, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if param not in ("messages", "n", "max_tokens", "stream_options"):
        assert param in err["message"]


def test_neutral_values_of_unsupported_fields_are_accepted(live: LiveServer) -> None:
    r = chat(live, {"messages": MESSAGES, "max_tokens": 2, "tools": [], "tool_choice": "none",
                    "response_format": {"type": "text"}, "logit_bias": {}, "modalities": ["text"], "seed": -1})
    assert r.status_code == 200, r.text


def test_shared_path_auth_model_metrics(live: LiveServer, default_model: BaseModel) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2}
    assert httpx.post(live.url + "/v1/chat/completions", json=body).status_code == 401
    r = chat(live, {**body, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    def ok_count() -> float:
        text = httpx.get(live.url + "/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("drllm_requests_total") and '"2xx"' in x)
        return float(line.split()[-1])

    before = ok_count()
    assert chat(live, body).status_code == 200
    assert ok_count() == before + 1


def test_model_without_chat_template_is_400() -> None:
    s = ServerSettings(routers="none", max_batch_size=2)
    for srv in run_server(build_app(s, Engine(s, model=toy_model()))):
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "no chat template" in r.json()["error"]["message"]
        ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


# --- routing profiles -------------------------------------------------------------------------------------
def test_profiles_listed_and_honoured(routed: LiveServer, default_model: BaseModel) -> None:
    name = default_model.name
    cards = httpx.get(routed.url + "/v1/models").json()["data"]
    assert [(c["id"], c.get("routing_profile")) for c in cards] == [(name, None), (f"{name}:full", "full"),
                                                                     (f"{name}:eco", "budget:0.8")]
    assert all(c["max_model_len"] == cards[0]["max_model_len"] for c in cards)
    client = OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0)
    prompt = "The three primary colours are"

    def routing(model: str, **extra: object) -> dict:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body=extra or None)
        return r.choices[0].model_extra["routing"]  # type: ignore[index]

    auto, full, eco = routing(name), routing(f"{name}:full"), routing(f"{name}:eco")
    assert full["plan"] == [1] * L and "decision_probs" not in full
    assert eco["layers_executed"] <= int(0.8 * L) and "decision_probs" in eco
    assert auto["plan"] != full["plan"]  # the decisive random routers do change the plan
    # the request's own routing fields win over the profile's
    assert routing(f"{name}:full", budget=0.5)["layers_executed"] <= 15
    assert routing(f"{name}:eco", routing="full")["plan"] == [1] * L
    assert routing(f"{name}:eco", plan=[1] * 20 + [0] * 10)["plan"] == [1] * 20 + [0] * 10
    r = client.chat.completions.create(model=f"{name}:full", messages=MESSAGES,  # type: ignore[arg-type]
                                       max_tokens=2, temperature=0)
    assert r.choices[0].model_extra["routing"]["plan"] == [1] * L  # type: ignore[index]
    for unknown in (f"{name}:nope", "other:full", f"{name}:", f"{name}:full:full"):
        for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})):
            resp = httpx.post(routed.url + path, json={**body, "model": unknown, "max_tokens": 1})
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", (unknown, path)


def test_disconnecting_chat_clients_free_their_rows(live: LiveServer, default_model: BaseModel) -> None:
    def gauge(name: str) -> float:
        text = httpx.get(live.url + "/metrics").text
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(name + "{"))

    def wait_idle() -> None:
        deadline = time.monotonic() + 10
        while gauge("drllm_num_requests_running") + gauge("drllm_num_requests_waiting") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gauge("drllm_num_requests_running") + gauge("drllm_num_requests_waiting") == 0

    def aborted() -> float:
        text = httpx.get(live.url + "/metrics").text
        return sum(float(x.split()[-1]) for x in text.splitlines()
                   if x.startswith("drllm_request_finished_total{") and 'finish_reason="abort"' in x)

    wait_idle()
    before = aborted()
    long = {"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**long, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the connection
        got = 0
        while got < 3:
            got += next(lines).startswith("data: ")
        assert gauge("drllm_num_requests_running") == 1
    wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(live.url + "/v1/chat/completions", json=long, headers=AUTH, timeout=httpx.Timeout(60, read=1.0))
    wait_idle()
    assert aborted() == before + 2

"""The completion server over real HTTP (uvicorn on a loopback port) with the default model on CPU.

The servers share the session's model: `live` (no routers, batch 8; mixed compute from fixed plans via the
`plan` extension), `routed` (decisive random routers saved as a checkpoint, for budgets), `small` (batch 1,
queue 1, API key) for 401/429, and `stuck` (an engine that never finishes loading) for 503.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from live import LiveServer, run_server
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from tiny import random_routers

from routing.model import BaseModel
from routing.routers import save_routers
from routing.sampling import choice_seed
from server.app import build_app, serve
from server.engine import Engine
from server.settings import ServerSettings

pytestmark = pytest.mark.slow

L = 30
SKIPS = [1] * 26 + [0] * 4
REPEATS = [1] * 10 + [2] * 2 + [1] * 18
MIXED = [0 if i in (20, 25) else 2 if i in (3, 4) else 1 for i in range(L)]  # 30 executions, 2 skips, 2 repeats
LIGHT = [1] * 15 + [0] * 15  # 15 executions
KEY = "sekret"


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()  # the engines set the process-wide CPU thread count
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(default_model: BaseModel) -> Iterator[LiveServer]:
    s = ServerSettings(routers="none", max_batch_size=8, max_queue=32)
    yield from run_server(build_app(s, Engine(s, model=default_model)))


@pytest.fixture(scope="module")
def small(default_model: BaseModel) -> Iterator[LiveServer]:
    s = ServerSettings(routers="none", max_batch_size=1, max_queue=1, api_key=KEY, served_model_name="small")
    yield from run_server(build_app(s, Engine(s, model=default_model)))


@pytest.fixture(scope="module")
def routed(default_model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ck = save_routers(tmp_path_factory.mktemp("routers") / "random", random_routers(default_model, 0), default_model)
    s = ServerSettings(routers=str(ck), max_batch_size=8)
    yield from run_server(build_app(s, Engine(s, model=default_model)))


class StuckEngine(Engine):
    def start(self) -> None:  # never loads: stays in LOADING
        pass


@pytest.fixture(scope="module")
def stuck() -> Iterator[LiveServer]:
    s = ServerSettings(routers="none")
    yield from run_server(build_app(s, StuckEngine(s)), wait_ready=False)


@pytest.fixture(scope="module")
def client(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(default_model: BaseModel) -> str:
    return default_model.name


def post(srv: LiveServer, body: dict, **kw: object) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=60, **kw)  # type: ignore[arg-type]


def complete(srv: LiveServer, **body: object) -> dict:
    r = post(srv, {"temperature": 0, "max_tokens": 6, **body})
    assert r.status_code == 200, r.text
    return r.json()


# --- metrics helpers ------------------------------------------------------------------------------------
Snapshot = dict[tuple[str, frozenset], float]


def scrape(srv: LiveServer) -> Snapshot:
    out: Snapshot = {}
    for fam in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(snap: Snapshot, name: str, model: str, **labels: str) -> float:
    return snap.get((name, frozenset({"model": model, **labels}.items())), 0.0)


def wait_idle(srv: LiveServer, model: str, timeout: float = 10.0) -> Snapshot:
    deadline = time.monotonic() + timeout
    while True:
        snap = scrape(srv)
        idle = (metric(snap, "drllm_num_requests_running", model) == 0
                and metric(snap, "drllm_num_requests_waiting", model) == 0)
        if idle or time.monotonic() > deadline:
            assert idle, "the server did not become idle"
            return snap
        time.sleep(0.05)


# --- basics ---------------------------------------------------------------------------------------------
def test_health_version_models(live: LiveServer, model_name: str) -> None:
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    v = httpx.get(live.url + "/version").json()
    assert v["model"] == model_name and v["state"] == "ready" and v["routers_loaded"] is False
    models = httpx.get(live.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [
        (model_name, 8192), (f"{model_name}:full", 8192), (f"{model_name}:eco", 8192)]  # the default profiles


def test_openai_client_completion(client: OpenAI, model_name: str, default_model: BaseModel) -> None:
    prompt = "The capital of France is"
    out = client.completions.create(model=model_name, prompt=prompt, max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.model == model_name and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.text and choice.finish_reason in ("stop", "length")
    n_prompt = len(default_model.tokenizer(prompt)["input_ids"])  # type: ignore[operator]
    assert out.usage is not None and out.usage.prompt_tokens == n_prompt
    assert out.usage.total_tokens == n_prompt + out.usage.completion_tokens
    routing = choice.routing  # type: ignore[attr-defined]
    assert routing == {"layers_total": L, "layers_executed": L, "layers_skipped": 0, "layers_repeated": 0,
                       "plan": [1] * L}


def test_openai_client_stream_matches_non_stream(client: OpenAI, model_name: str) -> None:
    kw = dict(model=model_name, prompt="Once upon a time", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    last = chunks[-1]
    assert last.choices == [] and last.usage == whole.usage
    assert last.routing == [whole.choices[0].routing]  # type: ignore[attr-defined]
    assert all(c.usage is None for c in chunks[:-1])


def test_routing_knobs_through_extra_body(client: OpenAI, model_name: str) -> None:
    def routing_of(extra: dict) -> dict:
        out = client.completions.create(model=model_name, prompt="Hello", max_tokens=2, temperature=0,
                                        extra_body=extra)
        return out.choices[0].routing  # type: ignore[attr-defined]

    assert routing_of({"budget": 1.0})["layers_executed"] <= L
    assert routing_of({"routing": "full"})["plan"] == [1] * L
    assert routing_of({"budget": 0.5, "routing": "full"})["layers_executed"] == L  # full bypasses the budget
    r = routing_of({"plan": MIXED})
    assert (r["plan"], r["layers_executed"], r["layers_skipped"], r["layers_repeated"]) == (MIXED, 30, 2, 2)
    assert routing_of({"plan": LIGHT, "budget": 0.5})["layers_executed"] == 15


def test_logprobs_and_echo(live: LiveServer, default_model: BaseModel) -> None:
    prompt = "The capital of France is"
    n_prompt = len(default_model.tokenizer(prompt)["input_ids"])  # type: ignore[operator]
    plain = complete(live, prompt=prompt, logprobs=2)
    lp = plain["choices"][0]["logprobs"]
    n = plain["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(2 <= len(top) <= 3 and max(top.values()) <= 0 for top in lp["top_logprobs"])
    assert lp["text_offset"][0] == 0

    echo = complete(live, prompt=prompt, logprobs=1, echo=True)
    choice, elp = echo["choices"][0], echo["choices"][0]["logprobs"]
    assert choice["text"] == prompt + plain["choices"][0]["text"]
    assert len(elp["tokens"]) == n_prompt + n
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert all(x is not None for x in elp["token_logprobs"][1:])
    assert "".join(elp["tokens"][:n_prompt]) == prompt
    offsets = [0]
    for tok in elp["tokens"][:-1]:
        offsets.append(offsets[-1] + len(tok))
    assert elp["text_offset"] == offsets
    assert elp["token_logprobs"][n_prompt:] == pytest.approx(lp["token_logprobs"], abs=1e-4)

    score = complete(live, prompt=prompt, logprobs=0, echo=True, max_tokens=0)  # prompt scoring
    assert score["choices"][0]["text"] == prompt and score["usage"]["completion_tokens"] == 0
    assert score["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        elp["token_logprobs"][1:n_prompt], abs=1e-4)


def test_stream_logprobs_and_echo(live: LiveServer) -> None:
    body = {"prompt": "Hi there", "max_tokens": 4, "temperature": 0, "logprobs": 1, "echo": True}
    whole = complete(live, **body)["choices"][0]
    chunks = _sse_chunks(live, {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]


def _sse_chunks(srv: LiveServer, body: dict) -> list[dict]:
    import json

    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln.removeprefix("data: ") for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_n_choices_with_seed(live: LiveServer) -> None:
    body = {"prompt": "My favourite colour is", "max_tokens": 5, "temperature": 1.0}
    both = post(live, {**body, "n": 2, "seed": 7}).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    first = post(live, {**body, "seed": 7}).json()["choices"][0]["text"]
    second = post(live, {**body, "seed": choice_seed(7, 1)}).json()["choices"][0]["text"]  # not seed 8
    assert [c["text"] for c in both["choices"]] == [first, second]
    assert both["usage"]["prompt_tokens"] == post(live, {**body, "seed": 7}).json()["usage"]["prompt_tokens"]


def test_token_id_prompts_and_prompt_lists(live: LiveServer, default_model: BaseModel) -> None:
    ids = default_model.tokenizer("Water boils at")["input_ids"]  # type: ignore[operator]
    by_text = complete(live, prompt="Water boils at")
    assert complete(live, prompt=ids)["choices"][0]["text"] == by_text["choices"][0]["text"]
    two = complete(live, prompt=[ids, ids[:2]], n=2)
    assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
    assert two["choices"][0]["text"] == two["choices"][1]["text"] == by_text["choices"][0]["text"]
    assert two["usage"]["prompt_tokens"] == len(ids) + 2
    strings = complete(live, prompt=["Water boils at", "Hello"])
    assert strings["choices"][0]["text"] == by_text["choices"][0]["text"]


def test_stop_string(live: LiveServer) -> None:
    out = complete(live, prompt="The capital of France is", max_tokens=12)["choices"][0]["text"]
    assert "." in out
    stopped = complete(live, prompt="The capital of France is", max_tokens=12, stop=["."])["choices"][0]
    assert stopped["text"] == out[:out.index(".")] and stopped["finish_reason"] == "stop"


# --- errors ---------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 9000}, "max_tokens"),  # beyond the 8192-token context
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": "!"}, "suffix"),
    ({"logit_bias": {"42": 3}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"budget": 0}, "budget"),
    ({"budget": 2.5}, "budget"),
    ({"budget": 0.5}, "budget"),  # no routers on this server
    ({"routing": "sometimes"}, "routing"),
    ({"plan": [1] * 29}, "plan"),
    ({"plan": [3] * 30}, "plan"),
    ({"plan": [1] * 30, "budget": 0.5}, "budget"),  # 30 executions > 15
    ({"min_tokens": 10, "max_tokens": 2}, "min_tokens"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"n": 40}, "n"),  # more sequences than the queue holds
]


@pytest.mark.parametrize("extra,param", BAD_REQUESTS, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_400_naming_the_field(live: LiveServer, extra: dict, param: str) -> None:
    r = post(live, {"prompt": "Hello", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_bodies_are_400(live: LiveServer) -> None:
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(live, {"max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_fields_ignored_unknown_model_404(live: LiveServer, model_name: str) -> None:
    assert post(live, {"prompt": "Hi", "max_tokens": 1, "frobnicate": True, "user": "u1"}).status_code == 200
    assert post(live, {"prompt": "Hi", "max_tokens": 1, "model": model_name}).status_code == 200
    r = post(live, {"prompt": "Hi", "max_tokens": 1, "model": "gpt-4"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    r = httpx.get(live.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_api_key(small: LiveServer) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        r = post(small, body, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(small.url + "/v1/models").status_code == 401
    assert post(small, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(small.url + "/health").status_code == 200
    assert httpx.get(small.url + "/metrics").status_code == 200
    out = OpenAI(base_url=small.url + "/v1", api_key=KEY, max_retries=0).completions.create(
        model="small", prompt="Hi", max_tokens=1)
    assert out.model == "small"


def test_queue_full_is_429_with_retry_after(small: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(headers=auth, timeout=60) as a, httpx.Client(headers=auth, timeout=60) as b:
        with a.stream("POST", small.url + "/v1/completions", json=long) as ra:
            lines = ra.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)  # the only batch row is busy
            with b.stream("POST", small.url + "/v1/completions", json=long) as rb:
                assert rb.status_code == 200  # queued: the queue (1) is now full
                r = post(small, {"prompt": "Hi", "max_tokens": 1}, headers=auth)
                assert r.status_code == 429
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
    wait_idle(small, "small")
    assert post(small, {"prompt": "Hi", "max_tokens": 1}, headers=auth).status_code == 200


def test_loading_is_503(stuck: LiveServer) -> None:
    r = httpx.get(stuck.url + "/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    r = post(stuck, {"prompt": "Hi"})
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert httpx.get(stuck.url + "/v1/models").status_code == 503
    assert httpx.get(stuck.url + "/metrics").status_code == 200


def test_engine_failure_is_500_without_internals_and_serving_goes_on(live: LiveServer) -> None:
    engine: Engine = live.app.state.engine  # type: ignore[attr-defined]
    gen = engine._gen
    assert gen is not None
    real_step, calls = gen.step, []

    def failing_step() -> list:
        calls.append(1)
        if len(calls) == 3:  # after the prefill and a decode step: the stream has started
            raise RuntimeError("secret internals")
        return real_step()

    gen.step = failing_step  # type: ignore[method-assign]
    chunks = _sse_chunks(live, {"prompt": "Hi", "max_tokens": 50, "ignore_eos": True, "stream": True})
    assert chunks[-1]["error"]["type"] == "server_error" and "secret" not in str(chunks[-1])
    assert engine._gen is not gen  # a fresh batch
    engine._gen.step = lambda: (_ for _ in ()).throw(RuntimeError("secret internals"))  # type: ignore[method-assign]
    r = post(live, {"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 500 and "secret" not in r.text and r.json()["error"]["type"] == "server_error"
    assert complete(live, prompt="Hi", max_tokens=2, ignore_eos=True)["usage"]["completion_tokens"] == 2


def test_explicit_router_path_that_fails_exits_clearly(default_model: BaseModel, monkeypatch, capsys) -> None:
    monkeypatch.setattr("server.engine.load_model", lambda *a, **k: default_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServerSettings(routers="/nonexistent/routers", port=port, log_level="warning")
    assert serve(settings) == 2
    err = capsys.readouterr().err
    assert "drllm: error: cannot serve" in err and "/nonexistent/routers" in err


# --- metrics --------------------------------------------------------------------------------------------
def test_metrics_move_by_exactly_what_the_requests_did(live: LiveServer, model_name: str,
                                                       default_model: BaseModel) -> None:
    m = model_name
    before = wait_idle(live, m)
    p1, p2 = "One two three", "Four five"
    n1 = len(default_model.tokenizer(p1)["input_ids"])  # type: ignore[operator]
    n2 = len(default_model.tokenizer(p2)["input_ids"])  # type: ignore[operator]
    complete(live, prompt=p1, max_tokens=5, ignore_eos=True, plan=MIXED, budget=1.0)
    complete(live, prompt=p2, max_tokens=3, ignore_eos=True, routing="full", n=2)
    assert post(live, {"prompt": "x", "max_tokens": -1}).status_code == 400
    after = wait_idle(live, m)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, m, **labels) - metric(before, name, m, **labels)

    assert delta("drllm_requests_total", status_class="2xx") == 2
    assert delta("drllm_requests_total", status_class="4xx") == 1
    assert delta("drllm_requests_total", status_class="5xx") == 0
    assert delta("drllm_request_finished_total", finish_reason="length") == 3
    assert delta("drllm_request_finished_total", finish_reason="stop") == 0
    assert delta("drllm_prompt_tokens_total") == n1 + 2 * n2
    assert delta("drllm_generation_tokens_total") == 5 + 2 * 3
    for h in ("drllm_e2e_request_latency_seconds", "drllm_time_to_first_token_seconds",
              "drllm_request_queue_time_seconds", "drllm_request_layers_executed",
              "drllm_request_layers_skipped", "drllm_request_layers_repeated"):
        assert delta(h + "_count") == 3, h
    assert delta("drllm_inter_token_latency_seconds_count") == 4 + 2 * 2
    assert delta("drllm_request_budget_count") == 1 and delta("drllm_request_budget_sum") == 1.0
    assert delta("drllm_request_layers_executed_sum") == 30 + 2 * 30
    assert delta("drllm_request_layers_skipped_sum") == 2
    assert delta("drllm_request_layers_repeated_sum") == 2
    assert delta("drllm_request_layers_executed_bucket", le="30.0") == 3
    assert delta("drllm_request_layers_executed_bucket", le="29.0") == 0
    assert delta("drllm_routing_decisions_total", layer="20", decision="skip") == 1
    assert delta("drllm_routing_decisions_total", layer="20", decision="execute") == 2
    assert delta("drllm_routing_decisions_total", layer="3", decision="repeat") == 1
    assert delta("drllm_routing_decisions_total", layer="0", decision="execute") == 3
    total = sum(delta("drllm_routing_decisions_total", layer=str(i), decision=d)
                for i in range(L) for d in ("skip", "execute", "repeat"))
    assert total == 3 * L
    assert metric(after, "drllm_num_requests_running", m) == 0


# --- routers and batching -----------------------------------------------------------------------------
def test_routed_budgets(routed: LiveServer, model_name: str) -> None:
    client = OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0)
    assert httpx.get(routed.url + "/version").json()["routers_loaded"] is True

    def routing_of(extra: dict) -> dict:
        out = client.completions.create(model=model_name, prompt="The weather today is", max_tokens=2,
                                        temperature=0, extra_body=extra)
        return out.choices[0].routing  # type: ignore[attr-defined]

    own = routing_of({})
    assert len(own["decision_probs"]) == L and all(sum(p) == pytest.approx(1, abs=1e-3) for p in own["decision_probs"])
    assert own["layers_skipped"] > 0 or own["layers_repeated"] > 0  # decisive random routers
    executed = []
    for budget in (2.0, 1.0, 0.75, 0.5, 0.25, 0.01):
        r = routing_of({"budget": budget})
        assert r["layers_executed"] <= max(1, int(budget * L + 1e-9)), budget
        executed.append(r["layers_executed"])
    assert executed == sorted(executed, reverse=True)
    full = routing_of({"routing": "full", "budget": 0.5})
    assert full["plan"] == [1] * L and "decision_probs" not in full


def test_concurrent_greedy_equals_sent_alone(routed: LiveServer, model_name: str) -> None:
    jobs = [("The capital of France is", {"budget": 0.5}),
            ("In 1969, astronauts", {"budget": 0.75}),
            ("def fibonacci(n):", {}),
            ("A haiku about the sea:\n", {"budget": 1.0}),
            ("Hello", {"routing": "full"}),
            ("The three primary colours are red,", {"plan": MIXED}),
            ("Once upon a time", {"plan": SKIPS, "logprobs": 1}),
            ("Water boils at", {"budget": 0.6, "n": 2})]
    client = AsyncOpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0)

    async def one(prompt: str, extra: dict) -> list[tuple[str, list[int]]]:
        extra = dict(extra)
        out = await client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0,
                                              n=extra.pop("n", 1), extra_body=extra)
        return [(c.text, c.routing["plan"]) for c in out.choices]  # type: ignore[attr-defined]

    async def run() -> tuple[list, list]:
        alone = [await one(p, e) for p, e in jobs]
        together = await asyncio.gather(*(one(p, e) for p, e in jobs))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert alone[5][0][1] == MIXED and alone[4][0][1] == [1] * L
    assert len({tuple(a[0][1]) for a in alone}) >= 5  # the batch really mixed plans


def test_disconnecting_clients_free_their_rows(live: LiveServer, model_name: str) -> None:
    before = wait_idle(live, model_name)
    long = {"prompt": "Count to a thousand:", "max_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the connection
        got = 0
        while got < 3:
            got += next(lines).startswith("data: ")
        t0 = time.monotonic()  # the server stays responsive while it decodes
        assert httpx.get(live.url + "/health").status_code == 200
        assert time.monotonic() - t0 < 1.0
        snap = scrape(live)
        assert metric(snap, "drllm_num_requests_running", model_name) == 1
    wait_idle(live, model_name, timeout=5)

    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(live.url + "/v1/completions", json=long, timeout=httpx.Timeout(60, read=1.0))
    after = wait_idle(live, model_name, timeout=5)
    aborted = (metric(after, "drllm_request_finished_total", model_name, finish_reason="abort")
               - metric(before, "drllm_request_finished_total", model_name, finish_reason="abort"))
    assert aborted == 2

"""lm-evaluation-harness's `local-completions` against drllm: its requests, byte for byte in shape, over HTTP.

lm-eval (0.4.x, `lm_eval/models/openai_completions.py`) scores a loglikelihood request with a batch of
token-id prompts (context + continuation), `echo: true, logprobs: 1, max_tokens: 1, temperature: 0`, and reads
`token_logprobs[ctxlen:-1]` (the continuation; the last entry is the one generated token) and `top_logprobs` for
its greedy flag. The logprobs must equal a no-cache recompute along the plan the server reports.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from live import LiveServer, run_server
from tiny import random_routers, reference_logits

from routing.model import BaseModel
from routing.plan import LayerPlan
from routing.routers import save_routers
from server.app import build_app
from server.engine import Engine
from server.settings import ServerSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def routed(default_model: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    threads = torch.get_num_threads()
    ck = save_routers(tmp_path_factory.mktemp("routers") / "random", random_routers(default_model, 0), default_model)
    s = ServerSettings(routers=str(ck), max_batch_size=8)
    yield from run_server(build_app(s, Engine(s, model=default_model)))
    torch.set_num_threads(threads)


def loglikelihood_payload(model: str, prompts: list[list[int]], max_tokens: int = 1) -> dict:
    """LocalCompletionsAPI._create_payload(generate=False) of lm-eval 0.4.x."""
    return {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1,
            "seed": 1234, "echo": True}


def parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """LocalCompletionsAPI.parse_logprobs of lm-eval 0.4.x (continuation logprob sum, is greedy)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens, strict=True):
        token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(token_logprobs, top_logprobs, strict=True))
        res.append((sum(token_logprobs), is_greedy))
    return res


def reference(model: BaseModel, plan: list[int], ids: list[int]) -> torch.Tensor:
    """Per-token logprobs [T-1] of ids[1:] and the argmax flags, from a no-cache forward along `plan`."""
    logits = reference_logits(model, LayerPlan(tuple(plan)), torch.tensor([ids]))[0].float()
    logp = torch.log_softmax(logits, -1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def greedy(model: BaseModel, plan: list[int], ids: list[int]) -> list[bool]:
    logits = reference_logits(model, LayerPlan(tuple(plan)), torch.tensor([ids]))[0]
    return [int(logits[i - 1].argmax()) == ids[i] for i in range(1, len(ids))]


@pytest.mark.parametrize("profile", ["full", None])
def test_loglikelihood_request_equals_a_no_cache_recompute(routed: LiveServer, default_model: BaseModel,
                                                           profile: str | None) -> None:
    tok = default_model.tokenizer
    context = tok("Question: What colour is the sky on a clear day?\nAnswer:")["input_ids"]  # type: ignore[operator]
    conts = [tok(" Blue")["input_ids"], tok(" Bright green, mostly")["input_ids"]]  # type: ignore[operator]
    prompts = [context + c for c in conts]
    name = default_model.name + (f":{profile}" if profile else "")
    r = httpx.post(routed.url + "/v1/completions", json=loglikelihood_payload(name, prompts), timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    parsed = parse_logprobs(out, [len(context)] * 2)
    for choice, ids, (total, is_greedy) in zip(out["choices"], prompts, parsed, strict=True):
        plan = choice["routing"]["plan"]
        if profile == "full":
            assert plan == [1] * default_model.spec.n_layers  # plan-independent scores
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        ref = reference(default_model, plan, ids)
        assert torch.tensor(lp["token_logprobs"][1:len(ids)]) == pytest.approx(ref, abs=2e-4)
        assert total == pytest.approx(float(ref[len(context) - 1:].sum()), abs=1e-3)
        assert is_greedy == all(greedy(default_model, plan, ids)[len(context) - 1:])
        # logprobs=1: the most likely token, plus the chosen one when it differs
        assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"][1:])
        # max_tokens 0 scores the same prompt the same way, without generating
        zero = httpx.post(routed.url + "/v1/completions",
                          json=loglikelihood_payload(name, [ids], max_tokens=0), timeout=120).json()["choices"][0]
        assert zero["routing"]["plan"] == plan and zero["text"] == tok.decode(ids)  # type: ignore[attr-defined]
        assert zero["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:len(ids)], abs=1e-4)


def test_routed_plans_depend_on_the_whole_prompt(routed: LiveServer, default_model: BaseModel) -> None:
    """Documented behaviour: with routers on, the scored continuation is part of the prompt the routers read,
    so two continuations of one context may be scored along different plans; `:full` never is."""
    tok = default_model.tokenizer
    context = tok("The weather today is")["input_ids"]  # type: ignore[operator]
    conts = [tok(w)["input_ids"] for w in (" sunny", " a complete and utter mystery to everyone")]  # type: ignore[operator]
    plans = {}
    for model in (default_model.name, default_model.name + ":full"):
        out = httpx.post(routed.url + "/v1/completions", timeout=120,
                         json=loglikelihood_payload(model, [context + c for c in conts])).json()
        plans[model] = [c["routing"]["plan"] for c in out["choices"]]
    assert plans[default_model.name + ":full"][0] == plans[default_model.name + ":full"][1]
    assert plans[default_model.name][0] != plans[default_model.name][1]  # the decisive random routers disagree


def test_generate_until_request(routed: LiveServer, default_model: BaseModel) -> None:
    """LocalCompletionsAPI._create_payload(generate=True): token-id prompts, `stop`, `max_tokens`, a seed."""
    ids = default_model.tokenizer("Q: 2 + 2 =\nA:")["input_ids"]  # type: ignore[operator]
    body = {"model": default_model.name + ":full", "prompt": [ids, ids], "max_tokens": 8, "temperature": 0.0,
            "stop": ["\n\n", "Q:"], "seed": 1234}
    out = httpx.post(routed.url + "/v1/completions", json=body, timeout=120).json()
    texts = [c["text"] for c in out["choices"]]
    assert len(texts) == 2 and texts[0] == texts[1] and "Q:" not in texts[0]

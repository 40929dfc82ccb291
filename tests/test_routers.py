"""Routers: pooling, shapes, sequential routing inside the prefill, budgets, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import random_routers, reference_logits, tiny_model

from routing.executor import RoutedExecutor
from routing.generation import BatchGenerator, GenerationRequest
from routing.plan import LayerPlan
from routing.planner import PlanRequest
from routing.router_net import RouterConfig, Routers, window_pool
from routing.routers import (
    RouterCheckpointError,
    RouterPlanner,
    RoutingPolicy,
    apply_budget,
    load_routers,
    save_routers,
)
from routing.sampling import SamplingParams


def naive_pool(h: torch.Tensor, T: int, window: int) -> torch.Tensor:
    W = min(window, T)
    bounds = [math.floor(w * T / W) for w in range(W + 1)]
    return torch.stack([h[bounds[w] : bounds[w + 1]].mean(0) for w in range(W)])


@pytest.mark.parametrize("T", [1, 3, 8, 13, 40])
def test_window_pool_matches_naive_definition(T: int) -> None:
    h = torch.randn(2, 45, 5)
    lengths = torch.tensor([T, 45])
    means, valid = window_pool(h, lengths, 8)
    assert means.shape == (2, 8, 5)
    assert valid[0].sum() == min(8, T) and valid[1].all()
    torch.testing.assert_close(means[0, : min(8, T)], naive_pool(h[0], T, 8))
    torch.testing.assert_close(means[1], naive_pool(h[1], 45, 8))
    # every valid token lands in exactly one window (remainders included, not dropped)
    torch.testing.assert_close(means[0, : min(8, T)].mul(torch.tensor(
        [len(range(math.floor(w * T / min(8, T)), math.floor((w + 1) * T / min(8, T)))) for w in range(min(8, T))],
        dtype=torch.float32)[:, None]).sum(0), h[0, :T].sum(0), atol=1e-5, rtol=0)


def test_shapes_and_parameter_count_of_the_default_size() -> None:
    r = Routers(RouterConfig(n_layers=30, hidden_size=576))
    assert r.n_parameters() == 30 * (576 * 128 + 128 + 128 * 3 + 3)  # 2,227,290 ≈ 2.2 M
    logits = r.layer_logits(4, torch.randn(3, 17, 576), torch.tensor([17, 5, 1]))
    assert logits.shape == (3, 3)
    assert isinstance(r.layers[0].act, torch.nn.GELU) and r.layers[0].act.approximate == "tanh"


class HandRouters(Routers):
    """Router 0 says skip; router l >= 1 records its input and says execute."""

    def __init__(self, n_layers: int, d: int) -> None:
        super().__init__(RouterConfig(n_layers=n_layers, hidden_size=d))
        self.seen: dict[int, torch.Tensor] = {}
        self.first = 0

    def layer_logits(self, layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.seen[layer] = hidden.clone()
        out = torch.zeros(hidden.shape[0], 3)
        out[:, self.first if layer == 0 else 1] = 5.0
        return out


def test_router_one_sees_the_state_after_router_zero_decided() -> None:
    model = tiny_model("llama")
    tokens = torch.randint(0, 96, (1, 7))
    seen = {}
    for first in (0, 1):  # block 0 skipped, then executed
        r = HandRouters(6, 64)
        r.first = first
        res = RouterPlanner(r).prefill(RoutedExecutor(model), tokens, torch.arange(1), torch.tensor([7]),
                                       [PlanRequest()])
        assert res.plans[0].counts[0] == first
        seen[first] = r.seen[1]
    emb = model.embed(tokens)
    torch.testing.assert_close(seen[0], emb)  # skip: router 1 sees the embeddings
    assert not torch.allclose(seen[1], emb)  # execute: it sees block 0's output


def routed_generate(model, routers, prompts, budgets, no_cache=False, max_batch=None):
    gen = BatchGenerator(model, max_batch=max_batch or len(prompts), planner=RouterPlanner(routers),
                         no_cache=no_cache)
    seqs = [gen.submit(GenerationRequest(p, SamplingParams(max_tokens=6, temperature=0, logprobs=0,
                                                           ignore_eos=True), budget=b))
            for p, b in zip(prompts, budgets, strict=True)]
    gen.run_to_completion()
    return seqs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_routed_cached_generation_equals_no_cache_recompute(arch: str) -> None:
    model = tiny_model(arch)
    routers = random_routers(model, 3)
    prompts = [[3, 14, 15, 92, 6], [2, 7, 1, 8, 2, 8, 18, 28]]
    for budget in (None, 0.5):
        cached = routed_generate(model, routers, prompts, [budget] * 2)
        fresh = routed_generate(model, routers, prompts, [budget] * 2, no_cache=True)
        for a, b in zip(cached, fresh, strict=True):
            assert a.plan == b.plan and a.generated == b.generated
            torch.testing.assert_close(torch.tensor([x.logprob for x in a.logprobs]),
                                       torch.tensor([x.logprob for x in b.logprobs]), atol=1e-4, rtol=0)
        assert any(s.plan.skipped or s.plan.repeated for s in cached)


def test_routed_batch_equals_rows_routed_alone() -> None:
    model = tiny_model("qwen2")
    routers = random_routers(model, 5)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42]]
    budgets = [None, 0.5, 1.5]
    together = routed_generate(model, routers, prompts, budgets)
    for i in range(3):
        alone = routed_generate(model, routers, [prompts[i]], [budgets[i]])[0]
        assert together[i].plan == alone.plan and together[i].generated == alone.generated
        torch.testing.assert_close(torch.tensor(together[i].decisions), torch.tensor(alone.decisions), atol=1e-5,
                                   rtol=0)


def test_budget_over_routers_plan_reruns_equal_a_fresh_prefill_of_the_capped_plan() -> None:
    model = tiny_model("llama")
    routers = random_routers(model, 8)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    res = RouterPlanner(routers).prefill(RoutedExecutor(model), tokens, torch.arange(1), torch.tensor([7]),
                                         [PlanRequest(budget=0.34)])
    plan = res.plans[0]
    assert plan.executions <= max(1, math.floor(0.34 * 6))
    ref = RoutedExecutor(model).forward(tokens, torch.zeros(1, dtype=torch.long),
                                        plans=torch.tensor([plan.counts])).logits
    torch.testing.assert_close(res.logits, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_static_budget_decides_along_the_plan_that_runs_in_one_forward(arch: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the static rule a budgeted prefill is one forward (no re-run): its plans fit the cap, skip the
    rule's blocks, its logits equal a no-cache recompute of each row's plan, and every router saw the hidden
    state entering its block along that plan."""
    model = tiny_model(arch)
    routers = random_routers(model, 8)
    policy = RoutingPolicy(None, None, "static", (4, 1, 3, 0, 2, 5))
    seen: dict[int, torch.Tensor] = {}
    inner = routers.layer_logits

    def spy(layer: int, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        seen[layer] = hidden.clone()
        return inner(layer, hidden, lengths)

    monkeypatch.setattr(routers, "layer_logits", spy)
    tokens = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4, 6])
    reqs = [PlanRequest(budget=0.5), PlanRequest(budget=1.5), PlanRequest()]
    ex = RoutedExecutor(model, max_batch=3)
    calls = []
    orig = ex.forward
    monkeypatch.setattr(ex, "forward", lambda *a, **k: calls.append(k.get("resume")) or orig(*a, **k))
    res = RouterPlanner(routers, policy).prefill(ex, tokens, torch.arange(3), lengths, reqs)
    assert calls == [None]  # one forward, no re-run
    half = res.plans[0]
    assert half.executions <= 3 and half.counts[4] == half.counts[1] == half.counts[3] == 0
    assert res.plans[1].executions <= 9
    assert any(p.repeated for p in res.plans) or any(p.skipped for p in res.plans[1:])
    for i in range(3):
        n = int(lengths[i])
        torch.testing.assert_close(res.logits[i], reference_logits(model, res.plans[i], tokens[i: i + 1, :n])[0, -1],
                                   atol=1e-5, rtol=0)
        entering = RoutedExecutor(model).forward(tokens[i: i + 1, :n], torch.zeros(1, dtype=torch.long),
                                                 plans=torch.tensor([res.plans[i].counts]), capture=True).entering
        assert entering is not None
        for layer in range(6):
            torch.testing.assert_close(seen[layer][i, :n], entering[layer][0], atol=1e-5, rtol=0)


plans_and_logits = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 2), min_size=n, max_size=n),
    st.lists(st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=3), min_size=n, max_size=n)))


@settings(max_examples=300, deadline=None)
@given(pl=plans_and_logits, b1=st.floats(0.01, 2.0), b2=st.floats(0.01, 2.0))
def test_budget_invariants(pl, b1: float, b2: float) -> None:
    counts, logits = pl
    L = len(counts)
    lo, hi = sorted((b1, b2))
    a, b = apply_budget(counts, logits, lo), apply_budget(counts, logits, hi)
    for budget, out in ((lo, a), (hi, b)):
        cap = max(1, math.floor(budget * L + 1e-9))
        assert sum(out) <= max(cap, 0) or sum(counts) == 0
        assert all(0 <= c <= o for c, o in zip(out, counts, strict=True))  # only demotions
        if sum(counts) <= cap:
            assert out == counts  # a plan that fits is left alone
        if sum(counts) >= 1:
            assert sum(out) >= 1  # at least one block always runs
    assert sum(a) <= sum(b)  # a smaller budget never yields more executions
    assert apply_budget(counts, logits, None) == counts


@settings(max_examples=15, deadline=None)
@given(budget=st.floats(0.05, 2.0), seed=st.integers(0, 10))
def test_budget_invariants_through_the_routed_prefill(budget: float, seed: int) -> None:
    model = _tiny_llama()
    routers = random_routers(model, seed)
    tokens = torch.tensor([[seed + 1, 4, 9, 16, 25]])
    run = lambda b: RouterPlanner(routers).prefill(RoutedExecutor(model), tokens, torch.arange(1),  # noqa: E731
                                                   torch.tensor([5]), [PlanRequest(budget=b)]).plans[0]
    free, capped = run(None), run(budget)
    assert 1 <= capped.executions <= max(1, math.floor(budget * 6 + 1e-9))
    if free.executions <= math.floor(budget * 6 + 1e-9):
        assert capped == free
    assert run(budget / 2).executions <= capped.executions


_cache: dict = {}


def _tiny_llama():
    if "m" not in _cache:
        _cache["m"] = tiny_model("llama")
    return _cache["m"]


def test_full_routing_bypasses_routers() -> None:
    model = tiny_model("llama")
    res = RouterPlanner(random_routers(model, 1)).prefill(
        RoutedExecutor(model, max_batch=2), torch.randint(0, 96, (2, 4)), torch.arange(2), torch.tensor([4, 4]),
        [PlanRequest(routing="full"), PlanRequest(plan=LayerPlan((0, 1, 2, 1, 0, 1)))])
    assert res.plans == [LayerPlan.full(6), LayerPlan((0, 1, 2, 1, 0, 1))]
    assert res.decisions == [None, None]


# --- checkpoints --------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path) -> None:
    model = tiny_model("llama")
    r = random_routers(model, 2)
    save_routers(tmp_path / "ck", r, model, training={"epochs": 1})
    back = load_routers(tmp_path / "ck", model)
    for a, b in zip(r.state_dict().values(), back.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    meta = json.loads((tmp_path / "ck" / "router.json").read_text())
    assert meta["base_model"]["n_layers"] == 6 and meta["base_model"]["fingerprint"] == model.fingerprint
    assert meta["router"] == {"window": 8, "bottleneck": 128, "classes": ["skip", "execute", "repeat"]}
    assert back.policy == RoutingPolicy()  # no policy stored: plain argmax routing


def test_checkpoint_keeps_the_calibrated_policy(tmp_path) -> None:
    from routing.checkpoint import update_meta

    model = tiny_model("llama")
    policy = RoutingPolicy(0.8, 0.95, "static", (3, 1, 0, 2, 4, 5))
    save_routers(tmp_path / "ck", random_routers(model, 2), model, policy=policy.to_dict())
    assert load_routers(tmp_path / "ck", model).policy == policy
    update_meta(tmp_path / "ck", policy=RoutingPolicy(0.6).to_dict())
    back = load_routers(tmp_path / "ck", model)  # the tensors' sha256 still matches
    assert back.policy == RoutingPolicy(0.6) and RouterPlanner(back).policy == RoutingPolicy(0.6)


def test_default_resolves_by_fingerprint(tmp_path, monkeypatch) -> None:
    model = tiny_model("llama")
    monkeypatch.setenv("DRLLM_ROUTERS_DIR", str(tmp_path))
    with pytest.raises(RouterCheckpointError, match="no router checkpoint is shipped"):
        load_routers("default", model)
    save_routers(tmp_path / "mine", random_routers(model, 0), model, default=True)
    save_routers(tmp_path / "other", random_routers(tiny_model("qwen2"), 0), tiny_model("qwen2"), default=True)
    assert load_routers("default", model) is not None


@pytest.mark.parametrize("case", ["other_layers", "other_width", "other_weights", "version", "no_tensors",
                                  "no_meta", "corrupt_tensors", "corrupt_json", "missing_dir", "bad_policy"])
def test_checkpoint_refusals(tmp_path, case: str) -> None:
    model = tiny_model("llama")
    d = tmp_path / "ck"
    save_routers(d, random_routers(model, 0), model)
    meta = json.loads((d / "router.json").read_text())
    if case == "other_layers":
        meta["base_model"]["n_layers"] = 7
    elif case == "other_width":
        meta["base_model"]["hidden_size"] = 128
    elif case == "other_weights":
        model = tiny_model("llama", seed=1)  # same shape, other weights
    elif case == "version":
        meta["format_version"] = 99
    elif case == "no_tensors":
        (d / "routers.safetensors").unlink()
    elif case == "no_meta":
        (d / "router.json").unlink()
    elif case == "corrupt_tensors":
        data = (d / "routers.safetensors").read_bytes()
        (d / "routers.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing_dir":
        d = tmp_path / "nowhere"
    elif case == "bad_policy":
        meta["policy"] = {"skip_threshold": 3.0}
    if case not in ("no_meta", "missing_dir"):
        (d / "router.json").write_text("{not json" if case == "corrupt_json" else json.dumps(meta))
    with pytest.raises(RouterCheckpointError) as e:
        load_routers(d, model)
    assert str(e.value)


def test_merge_reruns_joins_a_later_group_when_recomputing_is_cheaper_than_a_call() -> None:
    from routing.routers import merge_reruns
    groups = {5: [2], 1: [0, 3], 4: [1]}
    lengths = [4, 4, 100, 4]
    assert merge_reruns(groups, lengths, 6, 1000) == [(1, [0, 3, 1, 2])]
    assert merge_reruns(groups, lengths, 6, 0) == [(1, [0, 3]), (4, [1]), (5, [2])]
    # row 1 joins (3 blocks x 4 tokens < 8 x 2); row 2 (100 tokens) is cheaper in its own call
    assert merge_reruns(groups, lengths, 6, 8) == [(1, [0, 3, 1]), (5, [2])]


@pytest.mark.parametrize("call_tokens", [0, 10**6], ids=["one-call-per-layer", "merged"])
def test_budgeted_rows_rerun_together_or_apart_equal_fresh_prefills(call_tokens: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows over budget with different first demoted layers: re-run per layer or merged into one call from
    the earliest (their earlier blocks recomputed), each row's logits and cache equal a fresh prefill of its
    capped plan, and cached decode goes on from there."""
    from routing import routers as routers_mod
    monkeypatch.setitem(routers_mod.RERUN_CALL_TOKENS, "cpu", call_tokens)
    model = tiny_model("llama")
    planner = RouterPlanner(random_routers(model, 8))
    b = 4
    tokens = torch.randint(0, 96, (b, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7, 5, 6, 3])
    reqs = [PlanRequest(budget=x) for x in (0.2, 0.5, 0.8, 0.34)]
    ex = RoutedExecutor(model, max_batch=b)
    calls = []
    orig = ex.forward
    monkeypatch.setattr(ex, "forward", lambda *a, **k: calls.append(k.get("resume")) or orig(*a, **k))
    res = planner.prefill(ex, tokens, torch.arange(b), lengths, reqs)
    reruns = [c for c in calls if c is not None]
    firsts = {int((torch.tensor(p.counts) != torch.tensor(free.counts)).nonzero()[0])
              for p, free in zip(res.plans, RouterPlanner(planner.routers).prefill(
                  RoutedExecutor(model, max_batch=b), tokens, torch.arange(b), lengths,
                  [PlanRequest()] * b).plans, strict=True) if p != free}
    assert len(firsts) >= 2  # the case this test is about
    assert len(reruns) == (1 if call_tokens else len(firsts))
    for i in range(b):
        n = int(lengths[i])
        ref = reference_logits(model, res.plans[i], tokens[i: i + 1, :n])[0, -1]
        torch.testing.assert_close(res.logits[i], ref, atol=1e-5, rtol=0)
    step = torch.randint(0, 96, (b, 1))
    out = orig(step, lengths, plans=torch.tensor([p.counts for p in res.plans]))
    for i in range(b):
        n = int(lengths[i])
        seq = torch.cat([tokens[i, :n], step[i]])[None]
        torch.testing.assert_close(out.logits[i], reference_logits(model, res.plans[i], seq)[0, -1], atol=1e-5,
                                   rtol=0)

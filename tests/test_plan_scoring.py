"""Log-likelihood scoring, shared-prefix plan scoring, fidelity, greedy answers, the guard and the budget
rules, each against an independent computation (transformers forward through the plan's execution order)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import ARCHS, random_routers, reference_logits, tiny_model
from toytok import ToyTokenizer

from routing.executor import pad_right
from routing.offline.evaluate import Evaluator, wilson
from routing.offline.greedy import greedy_answers
from routing.offline.plan_scoring import PlanScorer
from routing.offline.supervision import Item
from routing.offline.tasks.base import Example
from routing.offline.tasks.scoring import (
    Criteria,
    PlanScore,
    encode,
    encode_fidelity,
    judge,
    mc_prediction,
    split_continuation,
)
from routing.plan import LayerPlan, execution_cap
from routing.planner import PlanRequest
from routing.policy import RoutingPolicy, StaticBudget
from routing.routers import RouterPlanner

PLANS = [(1, 1, 1, 1, 1, 1), (1, 0, 2, 1, 0, 1), (2, 1, 0, 0, 1, 2)]


def _model(arch: str, device: str):
    m = tiny_model(arch, seed=3)
    m.hf.to(device)
    m.tokenizer = ToyTokenizer()
    m.eos_token_ids = (95,)
    return m


def _ref_logprob(model, plan, ctx: list[int], cont: list[int]) -> tuple[float, int]:
    """Summed log-probability of `cont` after `ctx` and how many of its tokens are the argmax (reference)."""
    tokens = torch.tensor([ctx + cont], device=model.device)
    lp = torch.log_softmax(reference_logits(model, LayerPlan(plan), tokens)[0].float(), -1).cpu()
    P = len(ctx)
    total = sum(float(lp[P - 1 + i, t]) for i, t in enumerate(cont))
    agree = sum(int(lp[P - 1 + i].argmax()) == t for i, t in enumerate(cont))
    return total, agree


@pytest.mark.parametrize("arch", ARCHS)
def test_loglikelihood_equals_reference(arch: str, device: str) -> None:
    model = _model(arch, device)
    ex = Example("1", "t", "Which is cold?", ("ice", "a fire", "x", "the sun at noon"), "0")
    enc = encode(ex, model.tokenizer)
    assert enc.kind == "ll" and enc.chars == (3, 6, 1, 15)
    # lm-evaluation-harness's split: context "Question: ...\nAnswer:", continuation " " + choice
    assert model.tokenizer.decode(list(enc.ids)).endswith("\nAnswer:")
    assert model.tokenizer.decode(list(enc.conts[1])) == " a fire"
    sc = PlanScorer(model, max_rows=16)
    for plan in PLANS:
        (got,) = sc.score([(enc, plan)])
        for c, lp, am in zip(enc.conts, got.cont_logprob, got.cont_argmax, strict=True):
            want, agree = _ref_logprob(model, plan, list(enc.ids), list(c))
            assert lp == pytest.approx(want, abs=2e-4)
            assert am == agree


def test_shared_prefix_equals_each_choice_alone(device: str) -> None:
    model = _model("qwen2", device)
    exs = [Example(str(i), "t", q, ("ab", "c", "defg"), "1") for i, q in enumerate(("Why?", "A longer question?"))]
    encs = [encode(e, model.tokenizer) for e in exs]
    shared = PlanScorer(model, max_rows=32).score([(e, p) for e in encs for p in PLANS])
    alone_sc = PlanScorer(model, max_rows=4)
    k = 0
    for e in encs:
        for p in PLANS:
            for j, c in enumerate(e.conts):
                (one,) = alone_sc.score([(encode_fidelity(list(e.ids), list(c)), p)])
                assert one.cont_logprob[0] == pytest.approx(shared[k].cont_logprob[j], abs=1e-4)
                assert one.cont_argmax[0] == shared[k].cont_argmax[j]
            k += 1


def test_split_continuation_moves_trailing_space() -> None:
    tok = ToyTokenizer()
    ctx, cont = split_continuation(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_split_continuation_with_a_bpe_tokenizer(default_model) -> None:
    tok = default_model.tokenizer
    ctx, cont = split_continuation(tok, "Question: Is ice cold?\nAnswer:", " yes, it is")
    whole = tok("Question: Is ice cold?\nAnswer: yes, it is")["input_ids"]
    assert ctx + cont == whole and tok.decode(cont) == " yes, it is"


def test_acc_norm_divides_by_characters() -> None:
    ex = Example("1", "t", "q", ("aaaa", "b"), "0")
    enc = encode(ex, ToyTokenizer())
    s = PlanScore(cont_logprob=(-4.0, -2.0), cont_argmax=(0, 0))
    assert mc_prediction(enc, s) == 1  # acc: -2 > -4
    assert mc_prediction(enc, s, norm=True) == 0  # acc_norm: -1.0 per char > -2.0


def test_judge_multiple_choice_and_fidelity() -> None:
    ex = Example("1", "t", "q", ("a", "b", "c"), "0")
    enc = encode(ex, ToyTokenizer())
    right, wrong1, wrong2 = (PlanScore(cont_logprob=v, cont_argmax=(0, 0, 0)) for v in
                             ((-1.0, -2.0, -3.0), (-2.0, -1.0, -3.0), (-2.0, -3.0, -1.0)))
    assert judge(enc, right, wrong1).ok and judge(enc, right, wrong1).correct  # a fix
    assert not judge(enc, wrong1, right).ok  # right -> wrong is never acceptable
    assert judge(enc, wrong1, wrong1).ok and not judge(enc, wrong1, wrong1).correct  # wrong answer kept
    assert not judge(enc, wrong2, wrong1).ok  # wrong -> another wrong
    assert not judge(enc, wrong1, wrong1, Criteria(keep_full_answer=False)).ok
    fid = encode_fidelity([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13])
    full = PlanScore(cont_logprob=(-10.0,), cont_argmax=(10,))
    assert judge(fid, PlanScore(cont_logprob=(-10.5,), cont_argmax=(10,)), full).ok  # -0.05 nats/token
    assert not judge(fid, PlanScore(cont_logprob=(-12.0,), cont_argmax=(10,)), full).ok  # -0.2 > margin 0.1
    assert not judge(fid, PlanScore(cont_logprob=(-10.0,), cont_argmax=(8,)), full).ok  # 80 % < 90 % agree


def test_greedy_answers_equal_reference(device: str) -> None:
    model = _model("llama", device)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    got = greedy_answers(model, prompts, [PLANS[1], PLANS[2]], max_new_tokens=6, batch=2)
    for prompt, plan, ans in zip(prompts, PLANS[1:], got, strict=True):
        seq = list(prompt)
        want = []
        for _ in range(6):
            nxt = int(reference_logits(model, LayerPlan(plan), torch.tensor([seq], device=model.device))[0, -1].argmax())
            if nxt == 95:
                break
            want.append(nxt)
            seq.append(nxt)
        assert ans == want


def test_fidelity_measure_on_a_planted_case(device: str) -> None:
    model = _model("llama", device)
    L = model.spec.n_layers
    prompt = [20, 21, 22, 23]
    full_answer = greedy_answers(model, [prompt], [(1,) * L], 8)[0]
    plan = PLANS[2]
    routed_answer = greedy_answers(model, [prompt], [plan], 8)[0]
    assert full_answer and routed_answer and routed_answer != full_answer
    item = Item("fidelity-x", "1", encode_fidelity(prompt, full_answer))
    ev = Evaluator(model, rows=8, batch=2, max_new_tokens=8)
    got = ev.fidelity([item, item], [plan, (1,) * L])
    lp_routed = _ref_logprob(model, (1,) * L, prompt, routed_answer)[0] / len(routed_answer)
    lp_full = _ref_logprob(model, (1,) * L, prompt, full_answer)[0] / len(full_answer)
    assert got[0] == pytest.approx(lp_routed - lp_full, abs=1e-4)
    assert got[1] == 0.0 and lp_routed < lp_full


def test_guard_an_unsure_router_executes(device: str) -> None:
    policy = RoutingPolicy(skip_threshold=0.8, repeat_threshold=0.9)
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.85, 0.1, 0.05], [0.05, 0.0001, 0.9499], [0.1, 0.85, 0.05]]))
    assert policy.decide(logits).tolist() == [1, 0, 2, 1]
    assert RoutingPolicy().decide(logits).tolist() == [0, 0, 2, 1]  # argmax skips the unsure one
    model = _model("qwen3", device)
    routers = random_routers(model, seed=0).to(device)
    with torch.no_grad():  # every router leans to skip with probability ~0.6
        for r in routers.layers:
            r.fc2.weight.zero_()
            r.fc2.bias.copy_(torch.log(torch.tensor([0.6, 0.3, 0.1])))
    from routing.executor import RoutedExecutor

    tokens, lengths = pad_right([[3, 4, 5, 6]])
    ex = RoutedExecutor(model, max_batch=1, capacity=16)
    guarded = RouterPlanner(routers, policy).prefill(ex, tokens, torch.arange(1), lengths, [PlanRequest()])
    assert guarded.plans[0] == LayerPlan.full(model.spec.n_layers)
    loose = RouterPlanner(routers, RoutingPolicy(0.5)).prefill(ex, tokens, torch.arange(1), lengths, [PlanRequest()])
    assert loose.plans[0].executions < model.spec.n_layers  # without the guard the same routers skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=12), st.floats(0.05, 2.0), st.floats(0.05, 2.0),
       st.randoms(use_true_random=False))
def test_static_budget_rule_invariants(decisions, b1, b2, rnd) -> None:
    """Whatever the routers decide: the plan fits the cap, runs at least one block, skips every block the
    rule skips up front, takes every other skip and execute as decided, and a smaller budget skips a superset
    up front."""
    L = len(decisions)
    order = tuple(rnd.sample(range(L), L))
    lo, hi = sorted((b1, b2))
    plans = {}
    for budget in (lo, hi):
        rule = StaticBudget(budget, L, order)
        out = [rule.step(layer, d) for layer, d in enumerate(decisions)]
        plans[budget] = (rule, out)
        assert 1 <= sum(out) <= execution_cap(budget, L) and rule.spent == sum(out)
        assert sum(rule.preskip) == max(0, L - execution_cap(budget, L))
        assert list(rule.preskip) == [i in order[: sum(rule.preskip)] for i in range(L)]
        for pre, d, c in zip(rule.preskip, decisions, out, strict=True):
            assert c == 0 if pre else (c == d or (d == 2 and c == 1) or (d == 0 and c == 1))
    assert all(x >= y for x, y in zip(plans[lo][0].preskip, plans[hi][0].preskip, strict=True))


def test_static_rule_skips_least_important_first_and_grants_repeats_that_fit() -> None:
    rule = StaticBudget(0.5, 4, (3, 0, 2, 1))  # cap 2: blocks 3 and 0 are skipped up front
    assert rule.plan() == (0, 1, 1, 0)
    assert [rule.step(i, d) for i, d in enumerate([2, 2, 1, 2])] == [0, 1, 1, 0]  # a repeat would not fit
    rule = StaticBudget(0.75, 4, (3, 0, 2, 1))  # cap 3: only block 3 up front
    assert [rule.step(i, d) for i, d in enumerate([0, 2, 1, 1])] == [0, 2, 1, 0]  # block 0's skip frees one
    rule = StaticBudget(0.25, 4, (3, 0, 2, 1))  # cap 1: only block 1 may run, and it must
    assert [rule.step(i, d) for i, d in enumerate([1, 0, 1, 1])] == [0, 1, 0, 0]
    with pytest.raises(ValueError):
        StaticBudget(0.0, 4, ())


def test_policy_round_trip_and_validation() -> None:
    p = RoutingPolicy(0.7, 0.9, "static", (2, 0, 1))
    assert RoutingPolicy.from_dict(p.to_dict()) == p
    assert RoutingPolicy.from_dict(None) == RoutingPolicy()
    with pytest.raises(ValueError):
        RoutingPolicy(budget_rule="static")
    with pytest.raises(ValueError):
        RoutingPolicy(skip_threshold=1.5)


def test_wilson_interval() -> None:
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(40.4, abs=0.1) and hi == pytest.approx(59.6, abs=0.1)
    assert wilson(0, 0) == (0.0, 0.0) and math.isclose(wilson(10, 10)[1], 100.0)


def test_search_order_ranks_blocks_by_how_often_they_were_skippable() -> None:
    from routing.offline.evaluate import search_order

    recs = [{"target": [1, 0, 1, 0]}, {"target": [1, 0, 0, 1]}, {"target": [0, 0, 1, 1]}]
    order, share = search_order(recs)
    assert order == [1, 0, 2, 3] and share == pytest.approx([1 / 3, 1.0, 1 / 3, 1 / 3])


def test_policy_decide_equals_the_tensor_rule_at_and_around_its_thresholds() -> None:
    """decide() applies the guard per row on the host; it must equal the rule written with tensor ops
    (float32 probabilities against the thresholds), also at probabilities that land on a threshold."""
    def tensor_rule(logits: torch.Tensor, ts: float, tr: float) -> torch.Tensor:
        p = torch.softmax(logits.float(), -1)
        skip, rep = p[:, 0] >= ts, p[:, 2] >= tr
        skip = skip & (~(skip & rep) | (p[:, 0] >= p[:, 2]))
        return torch.where(skip, 0, torch.where(rep & ~skip, 2, 1)).long()

    torch.manual_seed(0)
    logits = torch.randn(4000, 3) * 3
    at = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.1, 0.6], [0.45, 0.1, 0.45], [0.2, 0.2, 0.6]]))
    logits = torch.cat([logits, at, at + 1e-7])
    for ts, tr in ((0.6, 0.9), (0.4, 0.4), (0.6, 0.6), (0.3, 0.2)):
        got = RoutingPolicy(skip_threshold=ts, repeat_threshold=tr).decide(logits)
        assert torch.equal(got, tensor_rule(logits, ts, tr)), (ts, tr)
        assert set(got.tolist()) == {0, 1, 2}


def test_policy_argmax_on_the_host_equals_torch_argmax_with_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2000, 3).round(decimals=1)  # many ties
    logits = torch.cat([logits, torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]])])
    got = RoutingPolicy().decide_rows(logits)
    assert got == logits.argmax(-1).tolist()
    assert RoutingPolicy().decide(logits).tolist() == got

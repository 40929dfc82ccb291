"""The plan search on a tiny random model: MCTS finds a planted better plan, the tree branches, searches of
many examples in lockstep equal searching each alone, and the chain baseline stays within its budget."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from toytok import toy_model

from routing.offline.plan_scoring import PlanScorer
from routing.offline.search import (
    MCTS,
    SearchConfig,
    StaticChain,
    actions,
    apply_action,
    pool_targets,
    search_example,
    search_many,
)
from routing.offline.tasks.base import Example
from routing.offline.tasks.scoring import Criteria, Outcome, encode, is_correct


@pytest.fixture(scope="module")
def model(device):
    m = toy_model(seed=1)
    m.hf.to(device)
    return m


def _plant(model, plan: tuple[int, ...], start: int = 0) -> tuple[Example, object]:
    """An MC example whose gold choice is the log-likelihood argmax under `plan` but not under the full plan."""
    sc = PlanScorer(model, max_rows=16)
    L = model.spec.n_layers
    for k in range(start, start + 300):
        e = Example(str(k), "planted", f"Pick {k}", ("ab", "cd", "ef", "gh"), "0")
        enc = encode(e, model.tokenizer)
        full, routed = sc.score([(enc, (1,) * L), (enc, plan)])
        pf, pr = (max(range(4), key=lambda i, s=s: s.cont_logprob[i]) for s in (full, routed))
        if pf != pr:
            e = Example(str(k), "planted", e.question, e.choices, str(pr))
            enc = encode(e, model.tokenizer)
            assert is_correct(enc, routed) and not is_correct(enc, full)
            return e, enc
    raise AssertionError("no prompt separates the plans")


def test_actions_stay_within_limits() -> None:
    p = (1, 1, 2, 0)
    acts = actions(p)
    assert ("skip", 2) not in acts and ("skip2", 0) in acts and ("repeat", 3) not in acts
    assert apply_action(p, ("skip2", 0)) == (0, 0, 2, 0)
    assert all(sum(apply_action((2, 2, 2, 1), a)) <= 8 for a in actions((2, 2, 2, 1)))


def test_mcts_finds_planted_plan(model) -> None:
    L = model.spec.n_layers
    _, enc = _plant(model, (1, 0, 0, 1, 1, 1))
    # the paper's criterion (a plan must answer right) finds the planted fix
    res = search_example(PlanScorer(model, max_rows=40), enc, SearchConfig(simulations=48, batch=4, seed=0),
                         crit=Criteria(keep_full_answer=False))
    assert not res.base_correct and res.target_correct
    assert res.record(L)["fixed"]
    assert res.evals <= 48


def test_mcts_tree_branches(model) -> None:
    _, enc = _plant(model, (1, 1, 1, 0, 1, 1))
    s = MCTS(model.spec.n_layers, SearchConfig(simulations=30, batch=4))
    sc = PlanScorer(model, max_rows=40)
    from routing.offline.tasks.scoring import judge

    gen = s.steps()
    plans = next(gen)
    full = sc.score([(enc, plans[0])])[0]
    try:
        while True:
            plans = gen.send([judge(enc, x, full) for x in sc.score([(enc, p) for p in plans])])
    except StopIteration:
        pass
    assert s.evals == 30 and len(s.results) == 30
    root_children = {p for p in s.results if sum(c != 1 for c in p) <= 2 and p != (1,) * 6}
    assert len(root_children) > 1  # more than one edit of the root was explored: the tree branches


def test_lockstep_equals_alone(model) -> None:
    encs = [_plant(model, (1, 0, 0, 1, 1, 1), start=s)[1] for s in (0, 400)]
    cfg = SearchConfig(simulations=20, batch=4)
    together = search_many(PlanScorer(model, max_rows=24), encs, cfg, seeds=[3, 4])
    alone = [search_many(PlanScorer(model, max_rows=24), [e], cfg, seeds=[s])[0] for e, s in zip(encs, (3, 4), strict=True)]
    for a, b in zip(together, alone, strict=True):
        assert (a.target, a.target_correct, a.evals) == (b.target, b.target_correct, b.evals)
        assert a.target_soft == pytest.approx(b.target_soft, abs=1e-4)


def test_chain_baseline_runs(model) -> None:
    _, enc = _plant(model, (1, 0, 0, 1, 1, 1))
    res = search_example(PlanScorer(model, max_rows=40), enc, SearchConfig(simulations=16, batch=4), method="chain")
    assert res.evals <= 16


def test_search_config_rejects_unknown_method(model) -> None:
    with pytest.raises(ValueError, match="method"):
        search_many(PlanScorer(model), [], SearchConfig(), method="beam")
    assert torch.tensor(0).item() == 0


def _drive_static(L: int, order: tuple[int, ...], max_skip: int, ok_upto: int, exhaustive: bool = False,
                  correct: Callable[[int], bool] | None = None) -> StaticChain:
    """Run a StaticChain whose plan k is acceptable iff k <= ok_upto (k = blocks of `order` skipped), and
    correct iff `correct(k)` (default: acceptable)."""
    s = StaticChain(L, SearchConfig(order=order, max_skip=max_skip, simulations=32, exhaustive=exhaustive))
    gen = s.steps()
    plans = next(gen)
    try:
        while True:
            outs = []
            for p in plans:
                k = sum(c == 0 for c in p)
                assert p == s.plan_k(k)  # every plan asked for is a prefix of the order
                outs.append(Outcome(k <= ok_upto, 1.0, correct(k) if correct else k <= ok_upto))
            plans = gen.send(outs)
    except StopIteration:
        pass
    return s


@pytest.mark.parametrize("ok_upto", range(0, 10))
def test_static_chain_finds_longest_acceptable_prefix(ok_upto: int) -> None:
    L, order = 12, (7, 3, 9, 0, 11, 5, 2, 8, 1, 4)
    s = _drive_static(L, order, max_skip=8, ok_upto=ok_upto)
    plan, o = s.best()
    k = min(ok_upto, 8)
    assert o.ok and plan == s.plan_k(k) and sum(plan) == L - k
    assert all(plan[i] == 0 for i in order[:k]) and all(plan[i] == 1 for i in order[k:])
    assert s.evals <= 1 + math.ceil(math.log2(9))  # the full plan + bisection over k = 0..8


def test_static_chain_needs_an_order(model) -> None:
    enc = _plant(model, (1, 0, 0, 1, 1, 1))[1]
    with pytest.raises(ValueError, match="order"):
        search_example(PlanScorer(model, max_rows=40), enc, SearchConfig(), method="static")
    res = search_example(PlanScorer(model, max_rows=40), enc, SearchConfig(order=(2, 1, 4), max_skip=3),
                         method="static")
    skipped = {i for i, c in enumerate(res.target) if c == 0}
    assert skipped in (set(), {2}, {1, 2}, {1, 2, 4})


@pytest.mark.parametrize("ok_upto", [0, 2, 5, 9])
def test_exhaustive_static_chain_scores_every_prefix(ok_upto: int) -> None:
    L, order = 12, (7, 3, 9, 0, 11, 5, 2, 8, 1, 4)
    s = _drive_static(L, order, max_skip=5, ok_upto=ok_upto, exhaustive=True, correct=lambda k: k % 2 == 0)
    assert s.evals == 6 and set(s.results) == {s.plan_k(k) for k in range(6)}
    assert s.best()[0] == s.plan_k(min(ok_upto, 5))  # the same target as bisection
    assert s.result(0.0).prefix_correct == [True, False, True, False, True, False]


def _mc_record(task: str, i: int, prefix_correct: list[bool], order: list[int], L: int = 6) -> dict:
    return {"id": str(i), "task": task, "kind": "ll", "target": [1] * L, "target_executions": L,
            "base_correct": prefix_correct[0], "target_correct": prefix_correct[0], "shorter": False,
            "fixed": False, "prefix_correct": prefix_correct, "config": {"order": order}}


def test_pool_targets_takes_the_deepest_prefix_within_the_margin_per_task() -> None:
    order = [4, 1, 2, 0]
    # task a, 10 examples: accuracy per prefix 60, 60, 50, 60, 30 %: k = 3 at margin 5 (prefix 2, 10 points
    # below, is passed over); k = 4 at margin 30
    cols = [[1] * 6 + [0] * 4, [1] * 6 + [0] * 4, [1] * 5 + [0] * 5, [0] * 4 + [1] * 6, [1] * 3 + [0] * 7]
    a = [_mc_record("a", i, [bool(c[i]) for c in cols], order) for i in range(10)]
    b = [_mc_record("b", i, [True, True, True, True, True], order) for i in range(3)]  # never hurt: k = 4
    fid = {"id": "f", "task": "fidelity-x", "kind": "fidelity", "target": [1, 0, 1, 1, 1, 1],
           "prefix_correct": [True, False]}
    recs, report = pool_targets([*a, fid, *b], margin=5.0)
    assert report["a"]["k"] == 3 and report["a"]["accuracy_per_prefix"] == [60.0, 60.0, 50.0, 60.0, 30.0]
    assert report["b"]["k"] == 4 and "fidelity-x" not in report
    assert all(r["target"] == [1, 0, 0, 1, 0, 1] and r["target_executions"] == 3 for r in recs[:10])
    assert [r["target_correct"] for r in recs[:10]] == [bool(cols[3][i]) for i in range(10)]
    assert recs[10] is fid  # fidelity records are left as they are
    assert all(r["target"] == [0, 0, 0, 1, 0, 1] for r in recs[11:])
    assert pool_targets(a, margin=30.0)[1]["a"]["k"] == 4
    worse = [_mc_record("c", i, [i < 6, i < 5, i < 4], order) for i in range(10)]  # 60, 50, 40 %
    assert pool_targets(worse, margin=5.0)[1]["c"]["k"] == 0
    assert pool_targets(worse, margin=5.0)[0][0]["target"] == [1] * 6


def test_pool_targets_rejects_mixed_prefix_lengths() -> None:
    recs = [_mc_record("a", 0, [True, True], [1, 2]), _mc_record("a", 1, [True, True, False], [1, 2])]
    with pytest.raises(ValueError, match="prefix lengths"):
        pool_targets(recs, margin=1.0)

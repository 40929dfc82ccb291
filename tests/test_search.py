"""The plan search on a tiny random model: prefix reuse is exact, and MCTS finds a planted better plan."""

from __future__ import annotations

import pytest
import torch
from toytok import toy_model

from routing.executor import RoutedExecutor
from routing.offline.search import MCTS, PlanEvaluator, SearchConfig, actions, apply_action, search_example
from routing.offline.tasks.base import Example
from routing.offline.tasks.scoring import encode


@pytest.fixture(scope="module")
def model():
    return toy_model(seed=1)


def _plant(model, plan: tuple[int, ...]) -> tuple[Example, object]:
    """An MC example whose gold label is the argmax under `plan` but not under the full plan."""
    ex = RoutedExecutor(model, max_batch=2, capacity=256)
    L = model.spec.n_layers
    for k in range(200):
        e = Example(str(k), "planted", f"Pick {k}", ("a", "b", "c", "d"), "0")
        enc = encode(e, model.tokenizer)
        out = ex.forward(torch.tensor([enc.ids] * 2), torch.zeros(2, dtype=torch.long),
                         plans=torch.tensor([[1] * L, list(plan)]))
        full, routed = (int(out.logits[i][list(enc.labels)].argmax()) for i in range(2))
        if full != routed:
            e = Example(str(k), "planted", e.question, e.choices, str(routed))
            return e, encode(e, model.tokenizer)
    raise AssertionError("no prompt separates the plans")


def test_actions_stay_within_limits() -> None:
    p = (1, 1, 2, 0)
    acts = actions(p)
    assert ("skip", 2) not in acts and ("skip2", 0) in acts and ("repeat", 3) not in acts
    assert apply_action(p, ("skip2", 0)) == (0, 0, 2, 0)
    assert all(sum(apply_action((2, 2, 2, 1), a)) <= 8 for a in actions((2, 2, 2, 1)))


def test_prefix_reuse_is_exact(model) -> None:
    L = model.spec.n_layers
    e, enc = _plant(model, (1, 0, 0, 1, 1, 1))
    plans = [(1,) * L, (1, 0, 1, 1, 1, 1), (1, 1, 1, 2, 1, 1), (1, 1, 1, 0, 0, 1), (2, 1, 1, 1, 1, 0),
             (1, 0, 1, 2, 1, 1)]
    a = PlanEvaluator(RoutedExecutor(model, max_batch=4, capacity=256), enc, None, reuse=True)
    b = PlanEvaluator(RoutedExecutor(model, max_batch=4, capacity=256), enc, None, reuse=False)
    ra = a.evaluate(plans[:2]) + a.evaluate(plans[2:])
    rb = b.evaluate(plans)
    for x, y in zip(ra, rb, strict=True):
        assert x.correct == y.correct and x.soft == pytest.approx(y.soft, abs=1e-5)
    assert a.blocks_run < b.blocks_run


def test_mcts_finds_planted_plan(model) -> None:
    L = model.spec.n_layers
    e, enc = _plant(model, (1, 0, 0, 1, 1, 1))
    ex = RoutedExecutor(model, max_batch=8, capacity=256)
    res = search_example(ex, enc, None, SearchConfig(simulations=48, batch=4, seed=0))
    assert not res.base_correct and res.target_correct
    assert res.record(L)["fixed"]
    assert res.evals <= 48


def test_mcts_tree_branches(model) -> None:
    e, enc = _plant(model, (1, 1, 1, 0, 1, 1))
    ev = PlanEvaluator(RoutedExecutor(model, max_batch=8, capacity=256), enc, None)
    s = MCTS(ev, SearchConfig(simulations=30, batch=4, stop_saved=99, stop_on_fix=False))
    s.run()
    assert ev.evals == 30 and len(ev.results) == 30


def test_chain_baseline_runs(model) -> None:
    e, enc = _plant(model, (1, 0, 0, 1, 1, 1))
    ex = RoutedExecutor(model, max_batch=8, capacity=256)
    res = search_example(ex, enc, None, SearchConfig(simulations=16, batch=4), method="chain")
    assert res.evals <= 16

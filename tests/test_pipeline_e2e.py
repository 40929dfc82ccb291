"""A few-example search -> train -> eval run on a tiny random model, and the CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toytok import toy_model

from cli.main import build_parser
from routing.checkpoint import update_meta
from routing.offline.evaluate import Evaluator, calibrate, evaluate, random_plan, static_plan, write_report
from routing.offline.plan_scoring import PlanScorer
from routing.offline.search import SearchConfig, pool_targets, search_many
from routing.offline.supervision import Item, task_items
from routing.offline.tasks import make_math
from routing.offline.tasks.base import Example
from routing.offline.tasks.scoring import encode_fidelity, stop_ids
from routing.offline.train import TrainConfig, precompute, train_routers
from routing.router_net import RouterConfig
from routing.routers import load_routers, save_routers


@pytest.mark.parametrize(("method", "pooled"), [("mcts", False), ("static", False), ("static", True)])
def test_search_train_calibrate_eval_end_to_end(tmp_path: Path, method: str, pooled: bool) -> None:
    model = toy_model(seed=2)
    L = model.spec.n_layers
    tok = model.tokenizer
    mc = [Example(str(i), "toy-mc", f"Which {i}?", ("a", "b", "c"), str(i % 3)) for i in range(6)]
    short = make_math((1,), 2, "train", seed=0)
    items = task_items(mc + short, tok)
    items += [Item("fidelity-toy", str(i), encode_fidelity(list(tok(f"Say {i}")["input_ids"]), [40 + i, 41, 42]))
              for i in range(3)]
    scorer = PlanScorer(model, max_rows=16, stops=stop_ids(tok, model.eos_token_ids))
    order = tuple(reversed(range(L)))
    cfg = SearchConfig(simulations=8, batch=4, order=order, max_skip=3, exhaustive=pooled)
    res = search_many(scorer, [it.enc for it in items], cfg, method, seeds=list(range(11)))
    recs = [r.record(L) | {"id": it.id, "task": it.task, "kind": it.enc.kind, "config": {"order": list(order)}}
            for r, it in zip(res, items, strict=True)]
    assert all(len(r["target"]) == L and r["evals"] <= 8 for r in recs)
    if pooled:  # every multiple-choice example of the task gets the task's pooled prefix
        assert all(len(r["prefix_correct"]) == 4 for r in recs)
        recs, pooling = pool_targets(recs, margin=50.0)
        k = pooling["toy-mc"]["k"]
        assert {tuple(r["target"]) for r in recs[:6]} == {tuple(0 if i in order[:k] else 1 for i in range(L))}
    if method == "static":  # every target skips a prefix of the order, at most max_skip long
        for r in recs:
            k = r["target"].count(0)
            assert k <= 3 and all(r["target"][i] == (0 if j < k else 1) for j, i in enumerate(order))
    feats = precompute(model, [list(it.enc.ids) for it in items], [r["target"] for r in recs], window=4)
    assert feats.pooled.shape == (11, L, 4, model.spec.hidden_size)
    routers, info = train_routers(feats, RouterConfig(L, model.spec.hidden_size, window=4, bottleneck=16),
                                  TrainConfig(epochs=2, batch_size=4, val_fraction=0.25), progress=False)
    ckpt = save_routers(tmp_path / "ck", routers, model, training=info)
    loaded = load_routers(ckpt, model)
    ev = Evaluator(model, rows=16, batch=4, max_new_tokens=4)
    policy, report = calibrate(ev, loaded, items, [0.5, 0.9], progress=False)
    assert policy.skip_threshold in (0.5, 0.9) and sorted(policy.budget_order) == list(range(L))
    assert len(report["guard_grid"]) == 2 and report["chosen_budget_rule"] in ("margin", "static")
    update_meta(ckpt, policy=policy.to_dict(), calibration=report)
    loaded = load_routers(ckpt, model)
    assert loaded.policy == policy
    results = evaluate(ev, loaded, policy, items, [None, 0.8], progress=False)
    write_report(tmp_path / "rep", results, {"model": model.name, "routers": str(ckpt), "policy": policy.to_dict()})
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    by_task = {t["task"]: t for t in rep["tasks"]}
    assert set(by_task) == {"toy-mc", "math", "fidelity"}
    assert by_task["toy-mc"]["n"] == 6 and len(by_task["toy-mc"]["budgets"]) == 2
    assert by_task["toy-mc"]["budgets"][1]["routed"]["mean_executions"] <= 0.8 * L
    assert "garbled" in by_task["fidelity"]["budgets"][0]["routed"]
    for f in ("report.md", "accuracy_vs_executions.png", "fidelity_vs_executions.png", "decisions_heatmap.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0


def test_baseline_plans() -> None:
    import random

    assert static_plan([1, 3, 2, 0], 2, 4) == (1, 0, 1, 0)
    rng = random.Random(0)
    assert sum(random_plan(3, 6, rng)) == 3 and sum(random_plan(8, 6, rng)) == 8


def test_cli_has_pipeline_commands() -> None:
    p = build_parser()
    a = p.parse_args(["search", "--data", "math:n=1", "--out", "x.jsonl", "--shard", "1/2"])
    assert a.command == "search" and a.shard == "1/2"
    assert p.parse_args(["train", "--search", "s", "--out", "o"]).epochs == 20
    a = p.parse_args(["calibrate", "--routers", "r", "--data", "arc:p", "--fidelity", "everyday"])
    assert a.split == "calib" and a.fidelity == ["everyday"]
    assert p.parse_args(["eval", "--routers", "default", "--data", "arc:p", "--out", "o"]).command == "eval"


def test_every_command_help_renders() -> None:
    """argparse %-formats help strings: a bare '%' in one crashed `drllm --help` (regression)."""
    import argparse

    p = build_parser()
    assert "calibrate" in p.format_help() and "serve" in p.format_help()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in sub.choices.items():
        assert cmd.format_help(), name


def test_evaluator_memoizes_scores_per_example_and_plan() -> None:
    model = toy_model(seed=2)
    L = model.spec.n_layers
    items = task_items([Example(str(i), "toy-mc", f"Which {i}?", ("a", "b", "c"), "0") for i in range(3)],
                       model.tokenizer)
    ev = Evaluator(model, rows=16, batch=4)
    skip = (0,) + (1,) * (L - 1)
    first = ev.scores(items, [ev.full, skip, ev.full])
    n = ev.scorer.evals
    assert n == 3  # distinct (example, plan) pairs only
    again = ev.scores(items, [ev.full, skip, skip])
    assert ev.scorer.evals == n + 1  # only (item 2, skip) is new
    assert again[:2] == first[:2]
    fresh = PlanScorer(model, max_rows=16).score([(items[2].enc, skip)])[0]
    assert again[2].cont_logprob == pytest.approx(fresh.cont_logprob, abs=1e-5)


def test_skip_order_from_a_list_or_a_checkpoint(tmp_path: Path) -> None:
    """--order takes a comma list or a router checkpoint's budget_order (regression: after the move to cli/,
    the checkpoint branch imported `..policy` beyond the top-level package and raised ImportError)."""
    from cli.pipeline import _skip_order
    from routing.policy import RoutingPolicy

    assert _skip_order("3, 1,2", 6) == (3, 1, 2) and _skip_order(None, 6) == ()
    model = toy_model(seed=2)
    L = model.spec.n_layers
    routers, _ = train_routers(precompute(model, [[1, 2, 3]], [[1] * L], window=4),
                               RouterConfig(L, model.spec.hidden_size, window=4, bottleneck=8),
                               TrainConfig(epochs=1, val_fraction=0), progress=False)
    ck = save_routers(tmp_path / "ck", routers, model)
    order = tuple(reversed(range(L)))
    update_meta(ck, policy=RoutingPolicy(budget_rule="static", budget_order=order).to_dict())
    assert _skip_order(str(ck), L) == order
    for bad in ("0,0", f"0,{L}", "-1"):
        with pytest.raises(ValueError, match="distinct blocks"):
            _skip_order(bad, L)

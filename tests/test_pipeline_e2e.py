"""A few-example search -> train -> eval run on a tiny random model, and the CLI wiring."""

from __future__ import annotations

import json
from pathlib import Path

from toytok import toy_model

from routing.cli import build_parser
from routing.executor import RoutedExecutor
from routing.offline.evaluate import evaluate_task, random_plan, static_plan, write_report
from routing.offline.search import SearchConfig, search_example
from routing.offline.tasks import make_math
from routing.offline.tasks.base import Example
from routing.offline.tasks.scoring import encode, stop_ids
from routing.offline.train import TrainConfig, precompute, train_routers
from routing.router_net import RouterConfig
from routing.routers import load_routers, save_routers


def test_search_train_eval_end_to_end(tmp_path: Path) -> None:
    model = toy_model(seed=2)
    L = model.spec.n_layers
    tok = model.tokenizer
    mc = [Example(str(i), "toy-mc", f"Which {i}?", ("a", "b", "c"), str(i % 3)) for i in range(6)]
    short = make_math((1,), 2, "train", seed=0)
    ex = RoutedExecutor(model, max_batch=4, capacity=256)
    stops = stop_ids(tok, model.eos_token_ids)
    cfg = SearchConfig(simulations=8, batch=4)
    recs = []
    for e in mc + short:
        enc = encode(e, tok)
        recs.append(search_example(ex, enc, None if e.is_mc else stops, cfg).record(L))
    assert all(len(r["target"]) == L for r in recs)
    encs = [encode(e, tok) for e in mc + short]
    feats = precompute(model, [list(x.ids[:x.prompt_len]) for x in encs], [r["target"] for r in recs], window=4)
    assert feats.pooled.shape == (8, L, 4, model.spec.hidden_size)
    routers, info = train_routers(feats, RouterConfig(L, model.spec.hidden_size, window=4, bottleneck=16),
                                  TrainConfig(epochs=2, batch_size=4, val_fraction=0.25), progress=False)
    ckpt = save_routers(tmp_path / "ck", routers, model, training=info)
    loaded = load_routers(ckpt, model)
    results = [evaluate_task(model, loaded, mc, [None, 0.8], progress=False),
               evaluate_task(model, loaded, short, [None], progress=False)]
    write_report(tmp_path / "rep", results, {"model": model.name, "routers": str(ckpt), "prompt_format": "plain"})
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["tasks"][0]["n"] == 6 and len(rep["tasks"][0]["budgets"]) == 2
    assert rep["tasks"][0]["budgets"][1]["mean_executions"] <= 0.8 * L
    for f in ("report.md", "accuracy_vs_executions.png", "decisions_heatmap.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 0


def test_baseline_plans() -> None:
    import random

    assert static_plan([0.5, 0.1, 0.3, 0.2], 2) == (1, 0, 1, 0)
    rng = random.Random(0)
    assert sum(random_plan(3, 6, rng)) == 3 and sum(random_plan(8, 6, rng)) == 8


def test_cli_has_pipeline_commands() -> None:
    p = build_parser()
    a = p.parse_args(["search", "--data", "math:n=1", "--out", "x.jsonl", "--shard", "1/2"])
    assert a.command == "search" and a.shard == "1/2"
    assert p.parse_args(["train", "--search", "s", "--data", "arc:p", "--out", "o"]).epochs == 20
    assert p.parse_args(["eval", "--routers", "default", "--data", "arc:p", "--out", "o"]).command == "eval"

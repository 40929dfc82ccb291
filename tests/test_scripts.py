"""The analysis scripts behind the shipped checkpoints' reports: scripts/score_plans.py (shards merged
into one paired table) and scripts/probe_robustness.py (the AUC, its cross-validation, the features)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import torch
from tiny import tiny_model

from routing.router_net import window_pool

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_shard(path: Path, plans: dict[tuple[int, ...], list[list[float]]], gold: list[int]) -> None:
    path.write_text("".join(json.dumps({"plan": list(p), "acc": s, "norm": s}) + "\n" for p, s in plans.items()))
    path.with_suffix(".gold.json").write_text(json.dumps(gold))


def test_score_plans_merges_shards_into_one_paired_table(tmp_path: Path) -> None:
    sp = _script("score_plans")
    full, cut, only0 = (1, 1, 1), (1, 0, 1), (1, 1, 2)
    # shard 0: full right on q0, wrong on q1; the cut flips both. shard 1: full right, the cut keeps it
    _write_shard(tmp_path / "a.jsonl", {full: [[0.0, -1.0], [-2.0, 0.0]], cut: [[-1.0, 0.0], [0.0, -2.0]],
                                        only0: [[0.0, -1.0], [0.0, -1.0]]}, [0, 0])
    _write_shard(tmp_path / "b.jsonl", {full: [[-3.0, 0.0]], cut: [[-2.0, 0.0]]}, [1])
    rows, gold = sp.merge_shards([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert gold == [0, 0, 1]
    assert [tuple(r["plan"]) for r in rows] == [full, cut]  # only plans scored in every shard
    assert rows[1]["acc"] == [[-1.0, 0.0], [0.0, -2.0], [-2.0, 0.0]]
    table = sp.summary(rows, gold, norm=False)
    assert "3 questions; full depth 66.7 %" in table
    line = next(x for x in table.splitlines() if x.startswith("| s1 |"))
    assert "| 2 | +0.0 | +1/−1 |" in line


def test_plans_from_spec() -> None:
    sp = _script("score_plans")
    plans = sp.plans_from('[[2], [[0], [3]], []]', 4)
    assert plans == [(1, 1, 1, 1), (1, 1, 0, 1), (0, 1, 1, 2)]  # full first, duplicates dropped
    assert sp.describe(plans[2]) == "s0,r3"


def test_roc_auc_matches_a_hand_count() -> None:
    probe = _script("probe_robustness")
    # pairs (positive, negative): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4
    assert probe.roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 0.75


def test_cross_validated_probe_finds_a_planted_signal_and_no_more() -> None:
    probe = _script("probe_robustness")
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.5).float()
    noise = torch.randn(400, 16, generator=g)
    planted = noise.clone()
    planted[:, 3] += 2 * y  # one informative feature among 16
    assert probe.cv_auc(planted, y, wd=1e-2) > 0.8
    assert 0.35 < probe.cv_auc(noise, y, wd=1e-2) < 0.65


def test_probe_features_are_the_router_inputs_of_each_prompt_alone() -> None:
    probe = _script("probe_robustness")
    model = tiny_model("llama", seed=1)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    X = probe.prompt_features(model, prompts, window=2, batch=2)  # both prompts in one padded batch
    assert X.shape == (2, model.spec.n_layers, model.spec.hidden_size)
    # the hidden state entering block 0 is the embedding: window-pool it by hand, one prompt at a time
    for i, p in enumerate(prompts):
        h = model.embed(torch.tensor([p])).float()
        m, v = window_pool(h, torch.tensor([len(p)]), 2)
        want = (m * v[..., None]).sum(1) / v.sum(1, keepdim=True)
        torch.testing.assert_close(X[i, 0], want[0], atol=1e-5, rtol=1e-5)
    alone = probe.prompt_features(model, prompts[1:], window=2, batch=1)
    torch.testing.assert_close(X[1], alone[0], atol=1e-4, rtol=1e-4)

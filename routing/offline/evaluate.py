"""Evaluation and calibration of routers.

Evaluation: base (full depth) vs routed accuracy at several budgets, with static pruning and random plans
of the same execution count as baselines in the same run, each accuracy with its 95 % Wilson interval,
chance level and paired wins/losses against full depth; and for fidelity items (chat prompts) the fidelity
measure: the routed greedy answer and the full-depth answer are both scored by the full model (mean
log-probability per token); we report the mean difference (routed - full, nats/token) and the share of
routed answers more than 1 nat/token below the full-depth answer ("garbled").

Calibration: on calibration data, measure how much each block's single removal hurts (the static order,
used by the "static" budget rule and the static-pruning baseline), choose the guard threshold that saves
the most blocks while keeping accuracy and fidelity, and the budget rule that keeps more accuracy.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..executor import RoutedExecutor, pad_right
from ..model import BaseModel
from ..planner import PlanRequest
from ..policy import RoutingPolicy
from ..routers import RouterPlanner, Routers
from .greedy import greedy_answers
from .plan_scoring import PlanScorer
from .supervision import Item
from .tasks.scoring import (
    Encoded,
    PlanScore,
    choice_scores,
    encode_fidelity,
    is_correct,
    mc_prediction,
    mean_logprob,
    stop_ids,
)

Plan = tuple[int, ...]
GARBLED_NATS = 1.0  # a routed answer this far below the full-depth answer (nats/token) counts as garbled


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n, in percent."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (100 * max(0.0, c - h), 100 * min(1.0, c + h))


def group_name(task: str) -> str:
    """Report groups: math-l1..l5 -> math, fidelity-* -> fidelity."""
    if task.startswith("math-l"):
        return "math"
    if task.startswith("fidelity-"):
        return "fidelity"
    return task


def static_plan(order: Sequence[int], n_prune: int, L: int) -> Plan:
    """Skip the first n_prune blocks of `order` (least important first)."""
    drop = set(list(order)[:max(0, min(n_prune, L - 1))])
    return tuple(0 if i in drop else 1 for i in range(L))


def random_plan(executions: int, L: int, rng: random.Random) -> Plan:
    """A random plan with the given number of executions: random skips below L, random repeats above."""
    p = [1] * L
    if executions < L:
        for i in rng.sample(range(L), L - max(executions, 1)):
            p[i] = 0
    elif executions > L:
        for i in rng.sample(range(L), min(executions - L, L)):
            p[i] = 2
    return tuple(p)


def decision_shares(plans: list[Plan], L: int) -> list[list[float]]:
    """[L][3]: share of skip / execute / repeat per layer."""
    out = []
    for layer in range(L):
        c = [0, 0, 0]
        for p in plans:
            c[p[layer]] += 1
        out.append([x / max(len(plans), 1) for x in c])
    return out


class Evaluator:
    """Routes prompts, scores plans and measures fidelity for one base model."""

    def __init__(self, model: BaseModel, rows: int = 32, batch: int = 16, max_new_tokens: int = 48,
                 progress: bool = False) -> None:
        self.model, self.batch, self.max_new_tokens = model, batch, max_new_tokens
        self.progress = progress  # tqdm bars over plan evaluations and generated answers (stderr)
        self.L = model.spec.n_layers
        self.full: Plan = (1,) * self.L
        self.scorer = PlanScorer(model, max_rows=rows, stops=stop_ids(model.tokenizer, model.eos_token_ids),
                                 capacity=512)
        self._executor: RoutedExecutor | None = None
        self._memo: dict[tuple[Encoded, Plan], PlanScore] = {}
        self._fid_memo: dict[tuple[Encoded, Plan], float] = {}  # fidelity difference per (example, plan)

    def scores(self, items: Sequence[Item], plans: Sequence[Plan]) -> list[PlanScore]:
        """One `PlanScore` per (item, plan). Scores are memoized per (encoded example, plan): arms and
        guard thresholds that choose the same plan for an example (the full plan, a budget that does not
        bind) cost one evaluation."""
        todo = list(dict.fromkeys((it.enc, p) for it, p in zip(items, plans, strict=True)
                                  if (it.enc, p) not in self._memo))
        for key, sc in zip(todo, self.scorer.score(todo, progress=self.progress), strict=True):
            self._memo[key] = sc
        return [self._memo[(it.enc, p)] for it, p in zip(items, plans, strict=True)]

    @torch.inference_mode()
    def route(self, routers: Routers, policy: RoutingPolicy, items: Sequence[Item],
              budget: float | None) -> list[Plan]:
        """Each item's plan as the server decides it: routers inside the prefill of its prompt, the guard
        and the budget rule of `policy`."""
        if self._executor is None or self._executor.cache.capacity < max(len(it.enc.ids) for it in items):
            cap = max(len(it.enc.ids) for it in items) + 8
            self._executor = RoutedExecutor(self.model, max_batch=self.batch, capacity=cap)
        planner = RouterPlanner(routers, policy)
        plans: list[Plan] = []
        for k in range(0, len(items), self.batch):
            chunk = items[k:k + self.batch]
            tokens, lengths = pad_right([it.enc.ids for it in chunk])
            b = len(chunk)
            res = planner.prefill(self._executor, tokens, torch.arange(b), lengths, [PlanRequest(budget=budget)] * b)
            plans += [p.counts for p in res.plans]
        return plans

    def fidelity(self, items: Sequence[Item], plans: Sequence[Plan]) -> list[float]:
        """Per fidelity item: (full model's mean log-probability per token of the greedy answer along the
        plan) - (the same of the full-depth answer), nats. An empty routed answer counts as -inf."""
        out = [0.0] * len(items)
        memo = self._fid_memo
        want = [i for i, p in enumerate(plans) if p != self.full]
        todo = list({(items[i].enc, plans[i]): i for i in want if (items[i].enc, plans[i]) not in memo}.values())
        if todo:
            for i, d in zip(todo, self._fidelity_of(items, plans, todo), strict=True):
                memo[(items[i].enc, plans[i])] = d
        for i in want:
            out[i] = memo[(items[i].enc, plans[i])]
        return out

    def _fidelity_of(self, items: Sequence[Item], plans: Sequence[Plan], todo: list[int]) -> list[float]:
        out = {i: 0.0 for i in todo}
        answers = greedy_answers(self.model, [items[i].enc.ids for i in todo], [plans[i] for i in todo],
                                 self.max_new_tokens, self.batch, progress=self.progress)
        scorable = [(i, a) for i, a in zip(todo, answers, strict=True) if a]
        for i, a in zip(todo, answers, strict=True):
            if not a:
                out[i] = -math.inf
        encs = [encode_fidelity(list(items[i].enc.ids), a) for i, a in scorable]
        got = self.scorer.score([(e, self.full) for e in encs])
        base = self.scores([items[i] for i, _ in scorable], [self.full] * len(scorable))  # once per prompt
        for (i, _), e, s, f in zip(scorable, encs, got, base, strict=True):
            out[i] = mean_logprob(e, s) - mean_logprob(items[i].enc, f)
        return [out[i] for i in todo]

    def importance(self, items: Sequence[Item], norm: bool = False, progress: bool = False) -> list[float]:
        """Per block: how much its single removal hurts on `items` (mean drop of the gold choice's
        log-probability among the choices for multiple choice, of the full answer's mean log-probability
        per token for fidelity and short answers), nats; larger = more important."""
        full = self.scores(items, [self.full] * len(items))
        drops = []
        layers: Sequence[int] = range(self.L)
        if progress:
            from tqdm import tqdm

            layers = tqdm(layers, desc="single-block removal", unit="block")
        for layer in layers:
            plan = tuple(0 if i == layer else 1 for i in range(self.L))
            got = self.scores(items, [plan] * len(items))
            drops.append(sum(_quality(it, f, norm) - _quality(it, s, norm)
                             for it, s, f in zip(items, got, full, strict=True)) / max(1, len(items)))
        return drops


def _quality(it: Item, s: PlanScore, norm: bool) -> float:
    if it.enc.is_mc:
        sc = torch.tensor(choice_scores(it.enc, s, norm), dtype=torch.double)
        return float(torch.log_softmax(sc, -1)[it.enc.gold])
    return mean_logprob(it.enc, s)


def fidelity_stats(diffs: Sequence[float]) -> tuple[float, float]:
    """Per-answer fidelity differences (nats/token; -inf for an empty answer) -> (mean difference, each
    clipped at -10 so that an empty answer counts but does not swamp the mean; % garbled)."""
    n = max(1, len(diffs))
    return (sum(max(x, -10.0) for x in diffs) / n, 100 * sum(x < -GARBLED_NATS for x in diffs) / n)


def _chance(items: Sequence[Item]) -> float:
    mc = [it for it in items if it.enc.is_mc]
    return 100 * sum(1 / len(it.enc.conts or it.enc.labels) for it in mc) / max(1, len(mc))


@dataclass
class Arm:
    """One way of choosing plans for a set of items, and what it scored."""

    name: str
    plans: list[Plan]
    correct: list[bool] | None = None  # task items
    fid: list[float] | None = None  # fidelity items: routed - full mean log-probability (nats/token)

    def summary(self, L: int, base: list[bool] | None) -> dict[str, object]:
        n = len(self.plans)
        ex = sum(sum(p) for p in self.plans) / max(1, n)
        d: dict[str, object] = {"mean_executions": ex, "saved": L - ex,
                                "skips": sum(p.count(0) for p in self.plans) / max(1, n),
                                "repeats": sum(p.count(2) for p in self.plans) / max(1, n)}
        if self.correct is not None:
            k = sum(self.correct)
            d.update(accuracy=100 * k / max(1, n), ci95=wilson(k, n))
            if base is not None:
                d.update(wins=sum(c and not b for c, b in zip(self.correct, base, strict=True)),
                         losses=sum(b and not c for c, b in zip(self.correct, base, strict=True)))
        if self.fid is not None:
            delta, garbled = fidelity_stats(self.fid)
            d.update(fidelity_delta=delta, garbled=garbled, empty=sum(not math.isfinite(x) for x in self.fid),
                     n_finite=sum(math.isfinite(x) for x in self.fid))
        return d


def evaluate_group(ev: Evaluator, routers: Routers, policy: RoutingPolicy, items: list[Item],
                   budgets: list[float | None], static_order: Sequence[int], seed: int = 0,
                   norm: bool = False, baseline_budgets: Sequence[float | None] | None = None) -> dict[str, object]:
    """Base, routed (per budget), static and random arms on one group of items (one task); the baseline
    arms only at `baseline_budgets` (default: every budget)."""
    L = ev.L
    rng = random.Random(seed)
    is_fid = items[0].enc.kind == "fidelity"

    def score(arm: Arm) -> Arm:
        if is_fid:
            arm.fid = ev.fidelity(items, arm.plans)
        else:
            arm.correct = [is_correct(it.enc, s, norm) for it, s in zip(items, ev.scores(items, arm.plans),
                                                                          strict=True)]
        return arm

    base = score(Arm("full", [ev.full] * len(items)))
    rows = []
    for b in budgets:
        routed = score(Arm("routed", ev.route(routers, policy, items, b)))
        k = round(L - sum(sum(p) for p in routed.plans) / len(items))
        arms = [routed]
        if baseline_budgets is None or b in baseline_budgets:
            arms.append(score(Arm("static", [static_plan(static_order, k, L)] * len(items))))
            arms.append(score(Arm("random", [random_plan(sum(p), L, rng) for p in routed.plans])))
        rows.append({"budget": b, "static_pruned_blocks": max(0, k),
                     **{a.name: a.summary(L, base.correct) for a in arms},
                     "decision_shares": decision_shares(routed.plans, L)})
    out: dict[str, object] = {"task": group_name(items[0].task), "n": len(items), "kind": items[0].enc.kind,
                              "L": L, "base": base.summary(L, None), "budgets": rows}
    if not is_fid:
        out["chance"] = _chance(items)
    return out


def evaluate(ev: Evaluator, routers: Routers, policy: RoutingPolicy, items: list[Item],
             budgets: list[float | None], static_order: Sequence[int] | None = None, seed: int = 0,
             norm: bool = False, progress: bool = True,
             baseline_budgets: Sequence[float | None] | None = None) -> list[dict[str, object]]:
    """`evaluate_group` per task group; the static order defaults to the policy's budget order, else
    the single-removal importance measured on the items themselves."""
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(group_name(it.task), []).append(it)
    order = list(static_order or policy.budget_order)
    if not order:
        imp = ev.importance(items, norm, progress)
        order = sorted(range(ev.L), key=lambda i: imp[i])
    names = list(groups)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="eval", unit="task")
    return [evaluate_group(ev, routers, policy, groups[g], budgets, order, seed, norm, baseline_budgets)
            for g in names]


def calibrate(ev: Evaluator, routers: Routers, items: list[Item], thresholds: Sequence[float],
              repeat_threshold: float | None = 0.9, budget: float = 0.8, max_acc_drop: float = 0.5,
              max_garbled: float = 5.0, max_fid_drop: float = 0.3, norm: bool = False,
              progress: bool = True, order: Sequence[int] | None = None) -> tuple[RoutingPolicy, dict[str, object]]:
    """Choose the routing policy on calibration `items` (multiple choice and fidelity):
    1. the static order: blocks sorted by single-removal importance on the multiple-choice items (least first),
       unless `order` is given (e.g. `search_order` of the search records);
    2. the guard: the skip threshold (from `thresholds`) whose routed plans save the most executions while
       multiple-choice accuracy stays within `max_acc_drop` points of full depth, fidelity garbles at most
       `max_garbled` % and the mean fidelity difference is above -`max_fid_drop` (nats/token); if none
       qualifies, the most conservative threshold;
    3. the budget rule ("margin" or "static") with the higher multiple-choice accuracy at `budget`
       (ties: fewer garbled fidelity answers, then static)."""
    mc = [it for it in items if it.enc.is_mc]
    fid = [it for it in items if it.enc.kind == "fidelity"]
    imp: list[float] | None = None
    if order is None:
        imp = ev.importance(mc or items, norm, progress)  # multiple choice alone when there is some: cheaper
        order = sorted(range(ev.L), key=lambda i: imp[i])
    order = tuple(order)
    base_mc = [is_correct(it.enc, s, norm) for it, s in zip(mc, ev.scores(mc, [ev.full] * len(mc)), strict=True)]
    base_acc = 100 * sum(base_mc) / max(1, len(mc))

    def measure(policy: RoutingPolicy, b: float | None) -> dict[str, float]:
        row: dict[str, float] = {}
        if mc:
            plans = ev.route(routers, policy, mc, b)
            ok = [is_correct(it.enc, s, norm) for it, s in zip(mc, ev.scores(mc, plans), strict=True)]
            row.update(mc_accuracy=100 * sum(ok) / len(mc), mc_saved=ev.L - sum(map(sum, plans)) / len(mc))
        if fid:
            plans = ev.route(routers, policy, fid, b)
            delta, garbled = fidelity_stats(ev.fidelity(fid, plans))
            row.update(fidelity_delta=delta, garbled=garbled, fidelity_saved=ev.L - sum(map(sum, plans)) / len(fid))
        return row

    def ok(r: dict[str, float]) -> bool:
        return (r.get("mc_accuracy", base_acc) >= base_acc - max_acc_drop and r.get("garbled", 0.0) <= max_garbled
                and r.get("fidelity_delta", 0.0) >= -max_fid_drop)

    grid = []
    ts = list(thresholds)
    if progress:
        from tqdm import tqdm

        ts = tqdm(ts, desc="calibrate guard", unit="threshold")
    for t in ts:
        r = measure(RoutingPolicy(t, repeat_threshold), None)
        grid.append({"skip_threshold": t, **r, "qualifies": ok(r)})
    good = [g for g in grid if g["qualifies"]]
    saved = lambda g: g.get("mc_saved", 0.0) + g.get("fidelity_saved", 0.0)  # noqa: E731
    best = max(good, key=lambda g: (saved(g), g["skip_threshold"])) if good else max(
        grid, key=lambda g: g["skip_threshold"])
    tau = float(best["skip_threshold"])
    rules = {}
    for rule in ("margin", "static"):
        rules[rule] = measure(RoutingPolicy(tau, repeat_threshold, rule, order), budget)
    pick = max(("static", "margin"), key=lambda r: (rules[r].get("mc_accuracy", 0.0), -rules[r].get("garbled", 0.0)))
    policy = RoutingPolicy(tau, repeat_threshold, pick, order)
    report = {"base_mc_accuracy": base_acc, "n_mc": len(mc), "n_fidelity": len(fid), "importance": imp,
              "order": list(order), "guard_grid": grid, "chosen_skip_threshold": tau,
              "budget_rules_at": budget, "budget_rules": rules, "chosen_budget_rule": pick,
              "constraints": {"max_acc_drop": max_acc_drop, "max_garbled": max_garbled,
                              "max_fid_drop": max_fid_drop}}
    return policy, report


def search_order(records: Sequence[dict]) -> tuple[list[int], list[float]]:
    """A static order from search records: blocks sorted by how often the search found them skippable
    (the share of targets that skip them), most often first. -> (order, skip shares)."""
    L = len(records[0]["target"])
    share = [sum(r["target"][i] == 0 for r in records) / len(records) for i in range(L)]
    return sorted(range(L), key=lambda i: (-share[i], i)), share


def _fmt_acc(a: dict) -> str:
    lo, hi = a["ci95"]
    return f"{a['accuracy']:.1f} [{lo:.0f}–{hi:.0f}]"


def write_report(out: Path, results: list[dict[str, object]], meta: dict[str, object]) -> None:
    """report.json, report.md and the plots in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=2) + "\n")
    L = results[0]["L"] if results else "?"
    lines = ["# Routed evaluation", "", f"Model: {meta.get('model')}; routers: {meta.get('routers')}; "
             f"policy: {json.dumps(meta.get('policy'))}", "",
             "## Accuracy (multiple choice by log-likelihood)", "",
             "| task | n | chance | budget | full | routed | W/L vs full | exec | static (same exec) | random |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] == "fidelity":
            continue
        for b in r["budgets"]:  # type: ignore[union-attr]
            ro = b["routed"]
            st = f"{_fmt_acc(b['static'])} ({b['static_pruned_blocks']} pruned)" if "static" in b else "—"
            ra = _fmt_acc(b["random"]) if "random" in b else "—"
            lines.append(f"| {r['task']} | {r['n']} | {r.get('chance', 0):.1f} | {b['budget'] or 'none'} | "
                         f"{_fmt_acc(r['base'])} | {_fmt_acc(ro)} | +{ro['wins']}/−{ro['losses']} | "
                         f"{ro['mean_executions']:.2f} | {st} | {ra} |")
    lines += ["", f"Accuracy in % with its 95 % Wilson interval; W/L: examples routed right and full wrong / "
              f"the reverse. exec: mean block executions of L = {L} (a repeat counts 2). Static: the same "
              "number of blocks dropped for every prompt, least important first (the policy's static order: "
              "single-block removal measured in calibration, or the search's skip shares); "
              "random: per example a random plan with the routed plan's execution count."]
    if any(r["kind"] == "fidelity" for r in results):
        lines += ["", "## Fidelity (chat prompts; full model's mean log-probability per token of the answers)", "",
                  "| set | n | budget | arm | Δ nats/token vs full answer | garbled (< −1) | exec |",
                  "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["kind"] != "fidelity":
            continue
        for b in r["budgets"]:  # type: ignore[union-attr]
            for arm in ("routed", "static", "random"):
                if arm not in b:
                    continue
                a = b[arm]
                lines.append(f"| {r['task']} | {r['n']} | {b['budget'] or 'none'} | {arm} | "
                             f"{a['fidelity_delta']:+.3f} | {a['garbled']:.1f} % | {a['mean_executions']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out, results)


def plot(out: Path, results: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in results if r["kind"] != "fidelity"]
    if acc:
        fig, axes = plt.subplots(1, len(acc), figsize=(4.6 * len(acc), 3.8), squeeze=False)
        for ax, r in zip(axes[0], acc, strict=True):
            L = r["L"]
            base = r["base"]
            ax.axhline(r.get("chance", 0), color="grey", ls=":", lw=1, label="chance")
            ax.errorbar([L], [base["accuracy"]], yerr=[[base["accuracy"] - base["ci95"][0]],
                        [base["ci95"][1] - base["accuracy"]]], fmt="*", ms=11, color="k", capsize=3, label="full")
            for arm, style in (("routed", "o-"), ("static", "s--"), ("random", "^:")):
                bs = [b for b in r["budgets"] if arm in b]
                xs = [b[arm]["mean_executions"] for b in bs]
                ys = [b[arm]["accuracy"] for b in bs]
                lo = [y - b[arm]["ci95"][0] for y, b in zip(ys, bs, strict=True)]
                hi = [b[arm]["ci95"][1] - y for y, b in zip(ys, bs, strict=True)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=arm, alpha=0.85)
            ax.set_ylim(0, 100)
            ax.set_title(f"{r['task']} (n={r['n']}), 95 % CI")
            ax.set_xlabel("mean block executions")
            ax.set_ylabel("accuracy %")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_executions.png", dpi=110)
        plt.close(fig)
    fids = [r for r in results if r["kind"] == "fidelity"]
    if fids:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for r in fids:
            for arm, style in (("routed", "o-"), ("static", "s--"), ("random", "^:")):
                bs = [b for b in r["budgets"] if arm in b]
                ax.plot([b[arm]["mean_executions"] for b in bs], [b[arm]["garbled"] for b in bs], style, label=arm)
        ax.axhline(5, color="grey", ls=":", lw=1, label="target ≤ 5 %")
        ax.set_ylim(0, 100)
        ax.set_xlabel("mean block executions")
        ax.set_ylabel("garbled answers %")
        ax.set_title("fidelity on held-out chat prompts")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fidelity_vs_executions.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(len(results), 1, figsize=(9, 1.6 * len(results) + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        m = torch.tensor(r["budgets"][0]["decision_shares"]).T.numpy()  # [3, L]
        im = ax.imshow(m, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks([0, 1, 2], ["skip", "exec", "repeat"])
        ax.set_title(f"{r['task']}: decision share per layer (budget {r['budgets'][0]['budget'] or 'none'})",
                     fontsize=9)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(out / "decisions_heatmap.png", dpi=110)
    plt.close(fig)


__all__ = ["Evaluator", "calibrate", "evaluate", "evaluate_group", "mc_prediction", "random_plan", "static_plan",
           "wilson", "write_report"]

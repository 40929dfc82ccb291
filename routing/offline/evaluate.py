"""Evaluation: base vs routed accuracy at several budgets, with static ShortGPT pruning and random plans of
the same execution count as baselines in the same run, per-layer decision shares, report files and plots."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import torch

from ..executor import RoutedExecutor, pad_right
from ..generation import BatchGenerator, GenerationRequest
from ..model import BaseModel
from ..plan import LayerPlan
from ..planner import PlanRequest
from ..routers import RouterPlanner, Routers, apply_budget
from ..sampling import SamplingParams
from .tasks.base import Example
from .tasks.scoring import Encoded, encode, extract_number, judge, same_number

Plan = tuple[int, ...]


class Scorer:
    """Scores (example, plan) pairs: MC by label logits (one prefill), short answers by greedy generation."""

    def __init__(self, model: BaseModel, batch: int = 16, max_tokens: int = 12):
        self.model, self.batch, self.max_tokens = model, batch, max_tokens
        self.executor = RoutedExecutor(model, max_batch=batch, capacity=1024)
        self.L = model.spec.n_layers

    def score(self, exs: list[Example], encs: list[Encoded], plans: list[Plan]) -> list[bool]:
        out: list[bool] = [False] * len(exs)
        mc = [i for i, e in enumerate(exs) if e.is_mc]
        short = [i for i, e in enumerate(exs) if not e.is_mc]
        for k in range(0, len(mc), self.batch):
            idx = mc[k:k + self.batch]
            tokens, lengths = pad_right([encs[i].ids for i in idx])
            res = self.executor.forward(tokens, torch.zeros(len(idx), dtype=torch.long),
                                        plans=torch.tensor([plans[i] for i in idx]), lengths=lengths)
            for j, i in enumerate(idx):
                out[i] = judge(encs[i], res.logits[j])[0]
        if short:
            gen = BatchGenerator(self.model, max_batch=self.batch)
            seqs = [(i, gen.submit(GenerationRequest(list(encs[i].ids[:encs[i].prompt_len]),
                                                     SamplingParams(max_tokens=self.max_tokens, temperature=0),
                                                     plan=LayerPlan(plans[i])))) for i in short]
            gen.run_to_completion()
            for i, s in seqs:
                out[i] = same_number(extract_number(s.text), exs[i].answer)
        return out

    @torch.inference_mode()
    def route(self, routers: Routers, encs: list[Encoded]) -> tuple[list[Plan], list[list[list[float]]],
                                                                    list[bool | None]]:
        """Routers decide each prompt's plan during its prefill (RouterPlanner) -> (plans, per-layer decision
        logits [L][3], correctness of multiple-choice answers); budgets are applied afterwards with
        `apply_budget`."""
        plans: list[Plan] = []
        logits: list[list[list[float]]] = []
        correct: list[bool | None] = []
        planner = RouterPlanner(routers)
        for k in range(0, len(encs), self.batch):
            chunk = encs[k:k + self.batch]
            tokens, lengths = pad_right([e.ids[:e.prompt_len] for e in chunk])
            b = len(chunk)
            res = planner.prefill(self.executor, tokens, torch.arange(b), lengths, [PlanRequest()] * b)
            for j in range(b):
                plans.append(res.plans[j].counts)
                logits.append(res.decision_logits[j])  # type: ignore[arg-type]
                correct.append(judge(chunk[j], res.logits[j])[0] if chunk[j].is_mc else None)
        return plans, logits, correct

    @torch.inference_mode()
    def block_influence(self, encs: list[Encoded]) -> tuple[list[float], list[bool | None]]:
        """ShortGPT block influence: 1 - mean cosine(hidden in, hidden out) over the prompt tokens (the last
        block gets inf: its output is not captured, and ShortGPT never drops it in practice). The same pass
        gives the base correctness of multiple-choice prompts."""
        correct: list[bool | None] = []
        bi = torch.zeros(self.L, dtype=torch.float64)
        count = 0
        for k in range(0, len(encs), self.batch):
            chunk = encs[k:k + self.batch]
            tokens, lengths = pad_right([e.ids[:e.prompt_len] for e in chunk])
            b = len(chunk)
            res = self.executor.forward(tokens, torch.zeros(b, dtype=torch.long), plans=torch.ones(b, self.L,
                                        dtype=torch.long), lengths=lengths, capture=True, all_logits=False)
            assert res.entering is not None
            correct += [judge(e, res.logits[j])[0] if e.is_mc else None for j, e in enumerate(chunk)]
            valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
            hs = res.entering
            for layer in range(self.L - 1):
                h_in, h_out = hs[layer].float(), hs[layer + 1].float()
                cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
                bi[layer] += float((1 - cos)[valid.to(cos.device)].sum())
            count += int(lengths.sum())
        bi /= max(count, 1)
        bi[-1] = float("inf")  # the last block's output is not captured: it is never pruned
        return bi.tolist(), correct


def static_plan(bi: list[float], n_prune: int) -> Plan:
    """Skip the n_prune blocks of lowest influence (ShortGPT)."""
    L = len(bi)
    drop = set(sorted(range(L), key=lambda i: bi[i])[:max(0, min(n_prune, L - 1))])
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


def task_name(examples: list[Example]) -> str:
    """The common task of the examples: 'math' for math-l1..math-l5."""
    names = sorted({e.task for e in examples})
    if len(names) <= 1:
        return names[0] if names else ""
    prefix = os.path.commonprefix(names).rstrip("-l").rstrip("-")
    return prefix or "+".join(names)


def _merge(known: list[bool | None], fill: Callable[[list[int]], list[bool]]) -> list[bool]:
    """Fill the None entries of `known` by scoring those indices."""
    idx = [i for i, k in enumerate(known) if k is None]
    got = dict(zip(idx, fill(idx), strict=True)) if idx else {}
    return [bool(k) if k is not None else got[i] for i, k in enumerate(known)]


def _acc(xs: list[bool]) -> float:
    return 100.0 * sum(xs) / max(len(xs), 1)


def evaluate_task(model: BaseModel, routers: Routers, examples: list[Example], budgets: list[float | None],
                  fmt: str = "plain", seed: int = 0, batch: int = 16, progress: bool = True) -> dict[str, object]:
    L = model.spec.n_layers
    sc = Scorer(model, batch=batch)
    encs = [encode(e, model.tokenizer, fmt) for e in examples]
    full: Plan = (1,) * L
    steps = ["base", "route", "influence"] + [f"budget {b}" for b in budgets]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(steps), desc=f"eval {task_name(examples)}", unit="step")

    def tick() -> None:
        if bar is not None:
            bar.update(1)

    bi, base_mc = sc.block_influence(encs)
    base = _merge(base_mc, lambda idx: sc.score([examples[i] for i in idx], [encs[i] for i in idx],
                                                [full] * len(idx)))
    tick()
    routed, logits, routed_mc = sc.route(routers, encs)
    tick()
    tick()
    rng = random.Random(seed)
    rows = []
    shares = {}
    for b in budgets:
        plans = [tuple(apply_budget(list(p), lg, b)) for p, lg in zip(routed, logits, strict=True)]
        if b is None:
            acc = _merge(routed_mc, lambda idx, ps=plans: sc.score([examples[i] for i in idx], [encs[i] for i in idx],
                                                                   [ps[i] for i in idx]))
        else:
            acc = sc.score(examples, encs, plans)
        mean_exec = sum(sum(p) for p in plans) / max(len(plans), 1)
        k = round(L - mean_exec)
        stat = static_plan(bi, k)
        s_acc = sc.score(examples, encs, [stat] * len(examples))
        r_plans = [random_plan(sum(p), L, rng) for p in plans]
        r_acc = sc.score(examples, encs, r_plans)
        key = "none" if b is None else str(b)
        shares[key] = decision_shares(plans, L)
        rows.append({"budget": b, "routed_accuracy": _acc(acc), "mean_executions": mean_exec,
                     "layers_saved": L - mean_exec, "skips": sum(p.count(0) for p in plans) / len(plans),
                     "repeats": sum(p.count(2) for p in plans) / len(plans),
                     "static_pruned_blocks": max(0, k), "static_accuracy": _acc(s_acc),
                     "static_executions": sum(stat), "random_accuracy": _acc(r_acc),
                     "random_mean_executions": sum(sum(p) for p in r_plans) / len(r_plans),
                     "delta_vs_base": _acc(acc) - _acc(base)})
        tick()
    if bar is not None:
        bar.close()
    return {"task": task_name(examples), "n": len(examples), "base_accuracy": _acc(base),
            "base_executions": L, "budgets": rows, "decision_shares": shares, "block_influence": bi}


def write_report(out: Path, results: list[dict[str, object]], meta: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=2) + "\n")
    lines = ["# Routed evaluation", "", f"Model: {meta.get('model')}; routers: {meta.get('routers')}; "
             f"prompt format: {meta.get('prompt_format')}", "",
             "| task | n | budget | base acc | routed acc | Δ | mean exec | saved | static acc (pruned) | "
             "random acc |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for b in r["budgets"]:  # type: ignore[union-attr]
            lines.append(f"| {r['task']} | {r['n']} | {b['budget'] or 'none'} | {r['base_accuracy']:.1f} | "
                         f"{b['routed_accuracy']:.1f} | {b['delta_vs_base']:+.1f} | {b['mean_executions']:.2f} | "
                         f"{b['layers_saved']:.2f} | {b['static_accuracy']:.1f} ({b['static_pruned_blocks']}) | "
                         f"{b['random_accuracy']:.1f} |")
    lines += ["", "Accuracy in %. Executions per example (a repeat counts 2) of L = "
              f"{results[0]['base_executions'] if results else '?'}. Static: ShortGPT block-influence pruning of "
              "round(L - mean routed executions) blocks (influence measured on the task's own prompts); random: "
              "per example a random plan with the routed plan's execution count.", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out, results)


def plot(out: Path, results: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    if not n:
        return
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        bs = r["budgets"]  # type: ignore[assignment]
        L = r["base_executions"]
        ax.scatter([L], [r["base_accuracy"]], marker="*", s=120, label="base", color="k")
        ax.plot([b["mean_executions"] for b in bs], [b["routed_accuracy"] for b in bs], "o-", label="routed")
        ax.plot([b["static_executions"] for b in bs], [b["static_accuracy"] for b in bs], "s--", label="static")
        ax.plot([b["random_mean_executions"] for b in bs], [b["random_accuracy"] for b in bs], "^:", label="random")
        ax.set_title(f"{r['task']} (n={r['n']})")
        ax.set_xlabel("mean block executions")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_executions.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.6 * n + 0.6), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        shares = r["decision_shares"]  # type: ignore[assignment]
        key = next(iter(shares))
        m = torch.tensor(shares[key]).T.numpy()  # [3, L]
        im = ax.imshow(m, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks([0, 1, 2], ["skip", "exec", "repeat"])
        ax.set_title(f"{r['task']}: decision share per layer (budget {key})", fontsize=9)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(out / "decisions_heatmap.png", dpi=110)
    plt.close(fig)


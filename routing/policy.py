"""Routing policy: how per-layer router outputs become a plan — the calibrated guard (an unsure router
executes) and the budget rule that caps a plan's executions. Stored in a checkpoint's router.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .plan import EXECUTE, REPEAT, SKIP, execution_cap


@dataclass(frozen=True)
class RoutingPolicy:
    """How router outputs become a plan (stored in the checkpoint's router.json under "policy").

    Guard: a router deviates from "execute" only when its probability for skip (or repeat) reaches
    `skip_threshold` (`repeat_threshold`); an unsure router executes. None: plain argmax (the paper's rule).
    Budget: `budget_rule` "margin" demotes the decision the routers are least sure of; "static" first
    demotes repeats, then skips the executed blocks in `budget_order` (blocks whose removal hurts least
    first, measured on calibration data), so a tight budget never strips a block the whole model needs."""

    skip_threshold: float | None = None
    repeat_threshold: float | None = None
    budget_rule: str = "margin"
    budget_order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.budget_rule not in BUDGET_RULES:
            raise ValueError(f"budget_rule must be one of {BUDGET_RULES}")
        if self.budget_rule == "static" and not self.budget_order:
            raise ValueError("the static budget rule needs a budget_order")
        for t in (self.skip_threshold, self.repeat_threshold):
            if t is not None and not 0 <= t <= 1:
                raise ValueError("guard thresholds are probabilities in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RoutingPolicy:
        d = d or {}
        return cls(d.get("skip_threshold"), d.get("repeat_threshold"), d.get("budget_rule", "margin"),
                   tuple(int(i) for i in d.get("budget_order", ())))

    def to_dict(self) -> dict[str, Any]:
        return {"skip_threshold": self.skip_threshold, "repeat_threshold": self.repeat_threshold,
                "budget_rule": self.budget_rule, "budget_order": list(self.budget_order)}

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, 3] over (skip, execute, repeat) -> counts [b] (long)."""
        if self.skip_threshold is None and self.repeat_threshold is None:
            return logits.argmax(-1)
        # one softmax, then the rule per row on the host (a routed prefill calls this once per layer: a dozen
        # tiny tensor ops would cost more than the router). Thresholds are compared in float32, as a tensor
        # comparison with a Python scalar would.
        big = 2.0  # above any probability
        ts = big if self.skip_threshold is None else _f32(self.skip_threshold)
        tr = big if self.repeat_threshold is None else _f32(self.repeat_threshold)
        out = []
        for p_skip, _, p_rep in torch.softmax(logits.float(), -1).tolist():
            skip, rep = p_skip >= ts, p_rep >= tr
            if skip and rep:  # both pass: the likelier one (skip on a tie)
                skip = p_skip >= p_rep
            out.append(SKIP if skip else REPEAT if rep else EXECUTE)
        return torch.tensor(out, dtype=torch.long)

    def apply_budget(self, counts: list[int], logits: list[list[float]], budget: float | None) -> list[int]:
        if self.budget_rule == "static":
            return apply_budget_static(counts, logits, budget, self.budget_order)
        return apply_budget(counts, logits, budget)


BUDGET_RULES = ("margin", "static")


def _f32(x: float) -> float:
    """x rounded to float32 (how torch compares a float32 tensor with a Python scalar)."""
    return float(torch.tensor(x, dtype=torch.float32))


def apply_budget(counts: list[int], logits: list[list[float]], budget: float | None) -> list[int]:
    """Cap a routed plan at `execution_cap(budget, L)` executions.

    Policy: while over the cap, demote the decision the routers are least sure of (the smallest margin
    between the logit of its current count and the next lower count: repeat -> execute -> skip), ties to
    the lower layer. A plan that fits is returned unchanged, and a smaller budget continues the same
    demotion sequence, so it never yields more executions."""
    if budget is None:
        return list(counts)
    cap = execution_cap(budget, len(counts))
    out = list(counts)
    total = sum(out)
    while total > cap:
        best = min((lg[c] - lg[c - 1], i) for i, (c, lg) in enumerate(zip(out, logits, strict=True)) if c > 0)
        out[best[1]] -= 1
        total -= 1
    return out


def apply_budget_static(counts: list[int], logits: list[list[float]], budget: float | None,
                        order: tuple[int, ...]) -> list[int]:
    """Cap a routed plan at `execution_cap(budget, L)` executions: repeats are demoted first (least sure
    first, as in `apply_budget`), then executed blocks are skipped in `order` (least important first;
    blocks missing from `order` go last, in layer order). Same guarantees as `apply_budget`."""
    if budget is None:
        return list(counts)
    L = len(counts)
    cap = execution_cap(budget, L)
    out = list(counts)
    total = sum(out)
    while total > cap and any(c == REPEAT for c in out):
        best = min((lg[REPEAT] - lg[EXECUTE], i) for i, (c, lg) in enumerate(zip(out, logits, strict=True)) if c == REPEAT)
        out[best[1]] = EXECUTE
        total -= 1
    rank = list(dict.fromkeys([*order, *range(L)]))
    for i in rank:
        if total <= cap:
            break
        if out[i] == EXECUTE:
            out[i] = SKIP
            total -= 1
    return out

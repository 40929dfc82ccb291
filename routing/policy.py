"""Routing policy: how per-layer router outputs become a plan — the calibrated guard (an unsure router
executes) and the budget rule that caps a plan's executions. Stored in a checkpoint's router.json."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from .plan import EXECUTE, REPEAT, SKIP, execution_cap


@dataclass(frozen=True)
class RoutingPolicy:
    """How router outputs become a plan (stored in the checkpoint's router.json under "policy").

    Guard: a router deviates from "execute" only when its probability for skip (or repeat) reaches
    `skip_threshold` (`repeat_threshold`); an unsure router executes. None: plain argmax (the paper's rule).
    Budget: `budget_rule` "margin" demotes, after the prefill, the decision the routers are least sure of
    (`apply_budget`; the prefill re-runs from the first demoted block). "static" skips the first blocks of
    `budget_order` (blocks whose removal hurts least first, measured on calibration data) *while* the
    routers decide (`StaticBudget`), so a tight budget never strips a block the whole model needs, the
    routers see the residual stream of the plan that actually runs, and the prefill needs no re-run."""

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
        """logits [b, 3] over (skip, execute, repeat) -> counts [b] (long). See `decide_rows`."""
        return torch.tensor(self.decide_rows(logits), dtype=torch.long)

    def decide_rows(self, logits: torch.Tensor) -> list[int]:
        """logits [b, 3] over (skip, execute, repeat), float32 on the CPU -> each row's count (0, 1 or 2).

        Argmax without a guard (the first of tied logits, as torch.argmax). With a guard: one softmax, then
        the rule per row on the host, where a routed prefill calls this once per layer and each tensor op
        costs more than the host arithmetic. Probabilities are compared with the thresholds in float32, as
        a float32 tensor comparison with a Python scalar would."""
        if self.skip_threshold is None and self.repeat_threshold is None:
            return [0 if a >= b and a >= c else 1 if b >= c else 2 for a, b, c in logits.tolist()]
        ts, tr = self._thresholds
        out = []
        for p_skip, _, p_rep in torch.softmax(logits.float(), -1).tolist():
            skip, rep = p_skip >= ts, p_rep >= tr
            if skip and rep:  # both pass: the likelier one (skip on a tie)
                skip = p_skip >= p_rep
            out.append(SKIP if skip else REPEAT if rep else EXECUTE)
        return out

    @functools.cached_property
    def _thresholds(self) -> tuple[float, float]:
        big = 2.0  # above any probability: that deviation is never taken
        return (big if self.skip_threshold is None else _f32(self.skip_threshold),
                big if self.repeat_threshold is None else _f32(self.repeat_threshold))

    def static_budget(self, budget: float, n_layers: int) -> StaticBudget:
        """The "static" rule's decision filter for one prefill row under `budget` (see `StaticBudget`).
        Raises ValueError for another rule or a budget outside (0, 2]."""
        if self.budget_rule != "static":
            raise ValueError("static_budget needs the static budget rule")
        return StaticBudget(budget, n_layers, self.budget_order)


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


class StaticBudget:
    """The "static" budget rule, applied layer by layer while the routers decide a row's plan.

    With cap = `execution_cap(budget, L)`, the blocks that the rule skips up front are the first L - cap
    blocks of `order` (least important first; blocks missing from `order` follow in layer order): their
    routers are overruled. Every other block takes its router's (guarded) decision, except that a repeat is
    granted only while the plan still fits the cap with every later block not skipped up front executed once,
    and the last block that could run is executed when nothing ran before it. So a plan never exceeds the
    cap, at least one block always runs, the routers' own skips come on top of the budget's (they never
    make the rule run a block it skips up front), and since each decision is final when made, the prefill
    along the decisions is the prefill of the plan: no re-run. `preskip` is also the plan a budgeted
    request is expected to follow before its prefill (the scheduler's estimate).

    Raises ValueError for a budget outside (0, 2]."""

    def __init__(self, budget: float, n_layers: int, order: tuple[int, ...]) -> None:
        self.cap = execution_cap(budget, n_layers)
        rank = list(dict.fromkeys([*(i for i in order if 0 <= i < n_layers), *range(n_layers)]))
        skipped = set(rank[: max(0, n_layers - self.cap)])
        self.preskip = tuple(i in skipped for i in range(n_layers))
        self.spent = 0  # executions decided so far
        self._left = n_layers - len(skipped)  # blocks not skipped up front and not yet decided

    def plan(self) -> tuple[int, ...]:
        """The plan when every router says execute: (0 where skipped up front, else 1) per block."""
        return tuple(SKIP if s else EXECUTE for s in self.preskip)

    def step(self, layer: int, decision: int) -> int:
        """Block `layer`'s count (0, 1 or 2) given its router's decision; call once per block, in order."""
        if not self.preskip[layer]:
            self._left -= 1
        later = self._left  # later blocks not skipped up front (each assumed to run once)
        if self.preskip[layer]:
            count = SKIP
        elif decision == REPEAT and self.spent + REPEAT + later > self.cap:
            count = EXECUTE
        elif decision == SKIP and self.spent == 0 and later == 0:
            count = EXECUTE  # the last block that can run, and none ran: a plan runs at least one block
        else:
            count = decision
        self.spent += count
        return count

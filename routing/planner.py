"""Planners decide each row's layer plan during its prefill and run that prefill.

`FixedPlanner` runs the plan a request brings (or the full plan). The router-driven planner lives in
`routing.routers` and follows the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .executor import RoutedExecutor
from .plan import LayerPlan


@dataclass
class PlanRequest:
    """What a planner needs to know about one row."""

    plan: LayerPlan | None = None  # a fixed plan wins over everything else
    routing: str = "auto"  # "auto": routers (if any) decide; "full": every block once
    budget: float | None = None  # most executions as a fraction of L, in (0, 2]


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [b, V] last-token logits, or [b, n, V] with all_logits
    plans: list[LayerPlan]
    decisions: list[list[list[float]] | None]  # per row: per-layer probabilities over (skip, execute, repeat)


class Planner(Protocol):
    def prefill(self, executor: RoutedExecutor, tokens: torch.Tensor, rows: torch.Tensor,
                lengths: torch.Tensor, requests: list[PlanRequest], all_logits: bool = False) -> PrefillResult: ...

    def expected_plan(self, req: PlanRequest, n_layers: int) -> LayerPlan:
        """The plan this request will most likely run, known before its prefill (for admission)."""
        ...


def fixed_plan(req: PlanRequest, n_layers: int) -> LayerPlan:
    return req.plan if req.plan is not None else LayerPlan.full(n_layers)


def plans_tensor(plans: list[LayerPlan]) -> torch.Tensor:
    return torch.tensor([p.counts for p in plans], dtype=torch.long)


class FixedPlanner:
    """No routers: each row runs its own fixed plan, or every block once."""

    def expected_plan(self, req: PlanRequest, n_layers: int) -> LayerPlan:
        return fixed_plan(req, n_layers)

    def prefill(self, executor: RoutedExecutor, tokens: torch.Tensor, rows: torch.Tensor,
                lengths: torch.Tensor, requests: list[PlanRequest], all_logits: bool = False) -> PrefillResult:
        plans = [fixed_plan(r, executor.n_layers) for r in requests]
        start = torch.zeros(tokens.shape[0], dtype=torch.long)
        out = executor.forward(tokens, start, plans=plans_tensor(plans), rows=rows, lengths=lengths,
                               all_logits=all_logits)
        return PrefillResult(out.logits, plans, [None] * len(plans))

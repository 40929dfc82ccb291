"""Layer plans: for each of the L blocks a count in {0, 1, 2} (skip, execute, execute twice)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SKIP, EXECUTE, REPEAT = 0, 1, 2
DECISIONS = ("skip", "execute", "repeat")  # the names of the counts 0, 1, 2 (router classes, reports)
MAX_BUDGET = 2.0  # a budget is the most executions as a fraction of L: 2 = every block repeated


@dataclass(frozen=True)
class LayerPlan:
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        counts = tuple(self.counts)
        if not counts:
            raise ValueError("a layer plan needs at least one layer")
        bad = [(i, c) for i, c in enumerate(counts) if type(c) is not int or c not in (0, 1, 2)]
        if bad:
            i, c = bad[0]
            raise ValueError(f"layer plan count at layer {i} is {c!r}; each count must be 0 (skip), 1 or 2 (repeat)")
        object.__setattr__(self, "counts", counts)

    @classmethod
    def full(cls, n_layers: int) -> LayerPlan:
        return cls((1,) * n_layers)

    @classmethod
    def parse(cls, text: str, n_layers: int | None = None) -> LayerPlan:
        """Parse '1,1,0,2,...' (commas or spaces). With n_layers, the length is checked."""
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            counts = tuple(int(p) for p in parts)
        except ValueError as e:
            raise ValueError(f"layer plan {text!r} must be a comma-separated list of 0, 1 and 2") from e
        plan = cls(counts)
        if n_layers is not None:
            plan.check_length(n_layers)
        return plan

    def check_length(self, n_layers: int) -> None:
        if len(self.counts) != n_layers:
            raise ValueError(f"layer plan has {len(self.counts)} counts but the model has {n_layers} layers")

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def executions(self) -> int:
        """Block executions per token (a repeat counts 2)."""
        return sum(self.counts)

    @property
    def skipped(self) -> int:
        return sum(1 for c in self.counts if c == SKIP)

    @property
    def repeated(self) -> int:
        return sum(1 for c in self.counts if c == REPEAT)

    @property
    def execution_order(self) -> tuple[int, ...]:
        """Block indices in the order they run, e.g. (0, 1, 1, 3) for counts (1, 2, 0, 1)."""
        return tuple(i for i, c in enumerate(self.counts) for _ in range(c))

    def to_list(self) -> list[int]:
        return list(self.counts)

    def __str__(self) -> str:
        return ",".join(map(str, self.counts))


def budget_ok(budget: float) -> bool:
    """The one budget rule: 0 < budget <= MAX_BUDGET."""
    return 0 < budget <= MAX_BUDGET


def budget_conflict(budget: float, has_routers: bool, plan_executions: int | None = None,
                    n_layers: int | None = None) -> str | None:
    """Why a request's budget cannot be honoured, or None (the rule the server and `drllm generate` apply): a
    fixed plan of `plan_executions` must fit `execution_cap(budget, n_layers)`; without one, a budget under 1
    needs routers to choose the blocks to skip. Raises ValueError for a budget outside (0, 2], or for a plan
    without `n_layers`."""
    if plan_executions is not None:
        if n_layers is None:
            raise ValueError("a plan's budget check needs n_layers")
        limit = execution_cap(budget, n_layers)
        return (f"plan runs {plan_executions} blocks but budget {budget:g} allows at most {limit}"
                if plan_executions > limit else None)
    if budget < 1 and not has_routers:
        return f"budget {budget:g} < 1 needs routers to choose the blocks to skip, and none are loaded"
    return None


def execution_cap(budget: float, n_layers: int) -> int:
    """The most block executions a `budget` allows: max(1, floor(budget * L)), budget in (0, 2].

    Raises ValueError for a budget outside (0, 2] (2 = every block repeated)."""
    if not budget_ok(budget):
        raise ValueError("budget must be in (0, 2]")
    return max(1, math.floor(budget * n_layers + 1e-9))


def plan_summary(plan: LayerPlan) -> dict[str, object]:
    return {
        "layers_total": len(plan),
        "layers_executed": plan.executions,
        "layers_skipped": plan.skipped,
        "layers_repeated": plan.repeated,
        "plan": plan.to_list(),
    }


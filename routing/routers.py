"""Routing a prefill (Dr.LLM): per-layer routers decide each row's plan, capped by a compute budget.

Routers run inside the prefill, layer by layer: router l sees the residual stream entering block l along
the path already decided for blocks < l. The plan is then fixed for the whole generation.
"""

from __future__ import annotations

import torch

from .checkpoint import RouterCheckpointError, load_routers, save_routers
from .executor import RoutedExecutor
from .plan import LayerPlan
from .planner import PlanRequest, PrefillResult, fixed_plan
from .policy import RoutingPolicy, StaticBudget, apply_budget
from .router_net import RouterConfig, Routers

__all__ = ["RouterCheckpointError", "RouterConfig", "RouterPlanner", "Routers", "RoutingPolicy", "StaticBudget",
           "apply_budget", "load_routers", "save_routers"]


# a re-run call's fixed cost per block it runs, in token-rows of compute (reading the block's weights once):
# see routing.generation.PREFILL_CALL_TOKENS
RERUN_CALL_TOKENS = {"cpu": 48, "cuda": 4096}


def merge_reruns(by_layer: dict[int, list[int]], lengths: list[int], n_layers: int,
                 call_tokens: int) -> list[tuple[int, list[int]]]:
    """Re-run calls for over-budget rows: (first layer, rows), from rows grouped by their first demoted layer.

    A group resuming at a later layer f joins the call of the previous (earlier) one, f0, when recomputing
    its blocks f0..f-1 (identical inputs and plans there, so the same states) costs less than a call of
    its own: (f - f0) x its tokens < call_tokens x (L - f) token-block units."""
    merged: list[tuple[int, list[int]]] = []
    for f in sorted(by_layer):
        rows = by_layer[f]
        if merged:
            f0, prev = merged[-1]
            if (f - f0) * sum(lengths[i] for i in rows) < call_tokens * (n_layers - f):
                prev.extend(rows)
                continue
        merged.append((f, list(rows)))
    return merged


class RouterPlanner:
    """Decides each routed row's plan during its prefill; rows with fixed plans or routing="full" ride
    along in the same batch. A budget under the static rule filters the decisions as they are made
    (`StaticBudget`); under the margin rule, over-budget rows are re-run from their first demoted layer."""

    def __init__(self, routers: Routers, policy: RoutingPolicy | None = None) -> None:
        self.routers = routers
        self.policy = policy or getattr(routers, "policy", None) or RoutingPolicy()

    def expected_plan(self, req: PlanRequest, n_layers: int) -> LayerPlan:
        """Before the prefill: a fixed or full plan is exact; a budgeted request under the static rule is
        expected to skip the first blocks of the budget order (the routers' own free skips are not known
        until their prefill, so a routed request without that rule is expected to run every block)."""
        if req.plan is not None or req.routing == "full" or req.budget is None \
                or self.policy.budget_rule != "static":
            return fixed_plan(req, n_layers)
        return LayerPlan(self.policy.static_budget(req.budget, n_layers).plan())

    def prefill(self, executor: RoutedExecutor, tokens: torch.Tensor, rows: torch.Tensor,
                lengths: torch.Tensor, requests: list[PlanRequest], all_logits: bool = False) -> PrefillResult:
        L = executor.n_layers
        b = tokens.shape[0]
        routed = [r.plan is None and r.routing != "full" for r in requests]
        fixed_rows = {i: fixed_plan(r, L).counts for i, r in enumerate(requests) if not routed[i]}
        layer_logits: list[torch.Tensor] = []
        online: dict[int, StaticBudget] = {}  # rows whose budget filters the decisions as they are made
        if self.policy.budget_rule == "static":
            online = {i: self.policy.static_budget(r.budget, L) for i, r in enumerate(requests)
                      if routed[i] and r.budget is not None}

        def decide(layer: int, hidden: torch.Tensor, lens: torch.Tensor) -> list[int]:
            # on the host, in as few tensor ops as possible: each one runs cold after a block (see
            # Routers.layer_logits)
            lg = self.routers.layer_logits(layer, hidden, lens)
            if lg.dtype != torch.float32 or lg.device.type != "cpu":
                lg = lg.float().cpu()
            layer_logits.append(lg)
            counts = self.policy.decide_rows(lg)
            for i, plan in fixed_rows.items():
                counts[i] = plan[layer]
            for i, budget in online.items():
                counts[i] = budget.step(layer, counts[i])
            return counts

        # rows whose free plan is trimmed afterwards (margin rule): they may re-run from a captured state
        trimmed = [i for i, r in enumerate(requests) if routed[i] and r.budget is not None and i not in online]
        start = torch.zeros(b, dtype=torch.long)
        out = executor.forward(tokens, start, rows=rows, lengths=lengths, decide=decide,
                               all_logits=all_logits, capture=bool(trimmed))
        logits_by_row = torch.stack(layer_logits, 1)  # [b, L, 3]
        counts = out.counts.clone()
        rerun: list[int] = []
        for i in trimmed:
            capped = apply_budget(counts[i].tolist(), logits_by_row[i].tolist(), requests[i].budget)
            if capped != counts[i].tolist():
                counts[i] = torch.tensor(capped)
                rerun.append(i)
        logits = out.logits
        if rerun:
            logits = logits.clone()
            # rows sharing a first changed layer resume together from the captured hidden state
            by_layer: dict[int, list[int]] = {}
            for i in rerun:
                first = int((counts[i] != out.counts[i]).nonzero()[0])
                by_layer.setdefault(first, []).append(i)
            assert out.entering is not None
            call = RERUN_CALL_TOKENS.get(executor.model.device.type, RERUN_CALL_TOKENS["cuda"])
            for first, idx in merge_reruns(by_layer, lengths.tolist(), L, call):
                ix = torch.tensor(idx)
                h = out.entering[first][ix.to(out.entering[first].device)]
                res = executor.forward(tokens[ix], start[ix], plans=counts[ix], rows=rows[ix],
                                       lengths=lengths[ix], all_logits=all_logits, resume=(first, h))
                logits[ix.to(logits.device)] = res.logits
        probs = torch.softmax(logits_by_row, -1)
        plans = [LayerPlan(tuple(int(c) for c in counts[i])) for i in range(b)]
        decisions = [probs[i].tolist() if routed[i] else None for i in range(b)]
        return PrefillResult(logits, plans, decisions)

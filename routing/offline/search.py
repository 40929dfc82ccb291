"""Offline supervision: per-example search for a layer plan that answers correctly with the fewest block
executions (Dr.LLM), by a real UCT tree search, and the reference's chain-of-random-edits baseline.

Plans are edited from the full plan: skip one block, skip two consecutive blocks, or repeat a block (at
most 2L executions). A simulation expands one new child (progressive widening, so nodes branch) and
scores its plan; rewards back-propagate. Plans of one example are scored in batches (rows = plans) found
with virtual visits, and plans sharing a prefix resume from the memoized hidden state entering the first
differing block.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch

from ..executor import RoutedExecutor
from .tasks.scoring import Encoded, judge

Plan = tuple[int, ...]
Action = tuple[str, int]


@dataclass
class SearchConfig:
    simulations: int = 32  # plan evaluations per example (the root included)
    c_explore: float = 1.8  # UCT exploration constant
    length_penalty: float = 0.5  # reward = correct + soft_weight * soft - length_penalty * executions / L
    soft_weight: float = 0.25
    widen: float = 0.5  # a node may have ceil(widen * sqrt(visits)) children
    rollout: int = 6  # a simulation scores its new node's plan after 0..rollout further random edits
    batch: int = 8  # plans scored per forward
    stop_saved: int = 4  # early stop: a correct plan saving this many executions
    stop_on_fix: bool = True  # early stop: a correct plan for an example the full model gets wrong
    reuse: bool = True  # prefix reuse
    seed: int = 0


@dataclass
class Outcome:
    correct: bool
    soft: float


class PlanEvaluator:
    """Scores plans on one encoded example; caches results and, with reuse, prefix hidden states."""

    def __init__(self, executor: RoutedExecutor, enc: Encoded, stops: set[int] | None, reuse: bool = True):
        self.ex, self.enc, self.stops, self.reuse = executor, enc, stops, reuse
        self.L = executor.n_layers
        self.results: dict[Plan, Outcome] = {}
        self.memo: dict[Plan, torch.Tensor] = {}  # plan prefix of length l -> hidden entering block l [n, d]
        self.tokens = torch.tensor(enc.ids)[None]
        self.evals = 0
        self.blocks_run = 0  # block executions actually computed (per token)

    def evaluate(self, plans: list[Plan]) -> list[Outcome]:
        new = list(dict.fromkeys(p for p in plans if p not in self.results))
        for i in range(0, len(new), self.ex.max_batch):
            self._run(new[i:i + self.ex.max_batch])
        return [self.results[p] for p in plans]

    def _resume_layer(self, plan: Plan) -> int:
        for layer in range(self.L, -1, -1):
            if plan[:layer] in self.memo:
                return layer
        return -1

    def _run(self, plans: list[Plan]) -> None:
        # One forward for the whole batch: it starts at the shallowest memoized layer r_min; row i skips
        # blocks r_min..r_i-1 and gets its own memoized state injected when it reaches r_i (the executor
        # runs a block only for the rows that execute it, so each row pays only for blocks >= r_i).
        b = len(plans)
        firsts = [self._resume_layer(p) if self.reuse else -1 for p in plans]
        r_min = min(firsts)
        counts = torch.tensor(plans, dtype=torch.long)
        for i, r in enumerate(firsts):
            counts[i, max(r_min, 0):max(r, 0)] = 0
        inject: dict[int, list[int]] = {}
        for i, r in enumerate(firsts):
            if r > max(r_min, 0):
                inject.setdefault(r, []).append(i)

        def decide(layer: int, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            for i in inject.get(layer, ()):
                h[i] = self.memo[plans[i][:layer]]
            return counts[:, layer]

        tokens = self.tokens.expand(b, -1)
        resume = None
        if r_min >= 0:
            resume = (r_min, torch.stack([self.memo[p[:r_min]] for p in plans]))
        out = self.ex.forward(tokens, torch.zeros(b, dtype=torch.long), plans=counts, decide=decide,
                              all_logits=not self.enc.is_mc, capture=self.reuse, resume=resume)
        start = max(r_min, 0)
        if out.entering is not None:
            for k, h in enumerate(out.entering):
                layer = start + k
                for i, p in enumerate(plans):
                    if layer >= firsts[i] and p[:layer] not in self.memo:
                        self.memo[p[:layer]] = h[i].clone()
        for i, p in enumerate(plans):
            ok, soft = judge(self.enc, out.logits[i], self.stops)
            self.results[p] = Outcome(ok, soft)
            self.blocks_run += sum(p[max(firsts[i], 0):])
        self.evals += b


def actions(plan: Plan) -> list[Action]:
    L, total = len(plan), sum(plan)
    out: list[Action] = [("skip", i) for i, c in enumerate(plan) if c == 1 and total > 1]
    out += [("skip2", i) for i in range(L - 1) if plan[i] == plan[i + 1] == 1 and total > 2]
    out += [("repeat", i) for i, c in enumerate(plan) if c == 1 and total < 2 * L]
    return out


def apply_action(plan: Plan, a: Action) -> Plan:
    kind, i = a
    p = list(plan)
    if kind == "skip":
        p[i] = 0
    elif kind == "skip2":
        p[i] = p[i + 1] = 0
    else:
        p[i] = 2
    return tuple(p)


@dataclass
class Node:
    plan: Plan
    parent: Node | None
    untried: list[Action]
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    total: float = 0.0


@dataclass
class SearchResult:
    base_correct: bool
    base_soft: float
    target: Plan
    target_correct: bool
    target_soft: float
    evals: int
    stopped_early: bool
    best_reward: float
    seconds: float = 0.0
    blocks_run: int = 0

    def record(self, L: int) -> dict[str, object]:
        d = asdict(self)
        d["target"] = list(self.target)
        d["target_executions"] = sum(self.target)
        d["fixed"] = self.target_correct and not self.base_correct
        d["shorter"] = self.target_correct and sum(self.target) < L
        return d


class _Search:
    def __init__(self, ev: PlanEvaluator, cfg: SearchConfig):
        self.ev, self.cfg, self.L = ev, cfg, ev.L
        self.rng = random.Random(cfg.seed)
        self.root_plan: Plan = (1,) * self.L

    def reward(self, plan: Plan, o: Outcome) -> float:
        c = self.cfg
        return float(o.correct) + c.soft_weight * o.soft - c.length_penalty * sum(plan) / self.L

    def best(self) -> tuple[Plan, Outcome]:
        ok = [(sum(p), -o.soft, p) for p, o in self.ev.results.items() if o.correct]
        if not ok:
            return self.root_plan, self.ev.results[self.root_plan]
        p = min(ok)[2]
        return p, self.ev.results[p]

    def done(self) -> bool:
        base = self.ev.results[self.root_plan]
        plan, o = self.best()
        if not o.correct:
            return False
        if self.cfg.stop_on_fix and not base.correct:
            return True
        return sum(plan) <= self.L - self.cfg.stop_saved

    def result(self, early: bool, t0: float) -> SearchResult:
        base = self.ev.results[self.root_plan]
        plan, o = self.best()
        best_r = max(self.reward(p, q) for p, q in self.ev.results.items())
        return SearchResult(base.correct, base.soft, plan, o.correct, o.soft, self.ev.evals, early, best_r,
                            time.perf_counter() - t0, self.ev.blocks_run)


class MCTS(_Search):
    def _new_node(self, plan: Plan, parent: Node | None) -> Node:
        acts = actions(plan)
        self.rng.shuffle(acts)
        return Node(plan, parent, acts)

    def _rollout(self, plan: Plan) -> Plan:
        """Default policy: 0..rollout random edits past the new node (not yet scored plans preferred)."""
        for _ in range(5):
            p = plan
            for _ in range(self.rng.randint(0, self.cfg.rollout)):
                acts = actions(p)
                if not acts:
                    break
                p = apply_action(p, self.rng.choice(acts))
            if p not in self.ev.results:
                return p
        return plan

    def _select(self, root: Node) -> Node | None:
        node = root
        while True:
            node.visits += 1  # virtual visit; the reward is added at back-propagation
            allowed = max(1, math.ceil(self.cfg.widen * math.sqrt(node.visits)))
            if node.untried and len(node.children) < allowed:
                child = self._new_node(apply_action(node.plan, node.untried.pop()), node)
                node.children.append(child)
                child.visits += 1
                return child
            if not node.children:
                return None
            log_n = math.log(node.visits)
            node = max(node.children, key=lambda ch: ch.total / max(ch.visits, 1)
                       + self.cfg.c_explore * math.sqrt(log_n / max(ch.visits, 1)))

    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        root = self._new_node(self.root_plan, None)
        root.visits = 1
        root.total = self.reward(self.root_plan, self.ev.evaluate([self.root_plan])[0])
        early = False
        while self.ev.evals < self.cfg.simulations and not (early := self.done()):
            k = min(self.cfg.batch, self.cfg.simulations - self.ev.evals)
            leaves = [n for n in (self._select(root) for _ in range(k)) if n is not None]
            if not leaves:
                break
            scored = [self._rollout(n.plan) for n in leaves]
            for leaf, plan, o in zip(leaves, scored, self.ev.evaluate(scored), strict=True):
                r = self.reward(plan, o)
                n: Node | None = leaf
                while n is not None:
                    n.total += r
                    n = n.parent
        return self.result(early, t0)


class RandomChain(_Search):
    """The reference code's "MCTS": every node has one child, a random edit of its parent."""

    def run(self) -> SearchResult:
        t0 = time.perf_counter()
        self.ev.evaluate([self.root_plan])
        chain: list[Plan] = []
        plan = self.root_plan
        while len(chain) < self.cfg.simulations - 1:
            acts = actions(plan)
            plan = apply_action(plan, self.rng.choice(acts)) if acts else self.root_plan
            chain.append(plan)
        early = False
        for i in range(0, len(chain), self.cfg.batch):
            if early := self.done():
                break
            self.ev.evaluate(chain[i:i + self.cfg.batch])
        return self.result(early or self.done(), t0)


def search_example(executor: RoutedExecutor, enc: Encoded, stops: set[int] | None, cfg: SearchConfig,
                   method: str = "mcts") -> SearchResult:
    ev = PlanEvaluator(executor, enc, stops, cfg.reuse)
    s = MCTS(ev, cfg) if method == "mcts" else RandomChain(ev, cfg)
    return s.run()


def summarize(records: list[dict], L: int) -> dict[str, float]:
    """Search statistics over JSONL records: shares with a shorter correct plan and of wrong examples
    fixed, mean target executions, plan evaluations per second, blocks computed per evaluation."""
    n = max(len(records), 1)
    wrong = [r for r in records if not r["base_correct"]]
    secs = sum(r["seconds"] for r in records)
    evals = sum(r["evals"] for r in records)
    return {"examples": len(records), "method": records[0].get("method", "?") if records else "?",
            "reuse": records[0].get("config", {}).get("reuse") if records else None,
            "base_accuracy": sum(r["base_correct"] for r in records) / n,
            "target_correct": sum(r["target_correct"] for r in records) / n,
            "shorter_correct": sum(r["shorter"] for r in records) / n,
            "wrong_fixed": sum(r["fixed"] for r in wrong) / max(len(wrong), 1),
            "mean_target_executions": sum(r["target_executions"] for r in records) / n,
            "mean_saved_when_correct": sum(L - r["target_executions"] for r in records if r["target_correct"])
            / max(1, sum(r["target_correct"] for r in records)),
            "evals": evals, "evals_per_s": evals / max(secs, 1e-9),
            "blocks_per_eval": sum(r.get("blocks_run", 0) for r in records) / max(evals, 1)}

"""Offline supervision: per-example search for a layer plan that keeps the example acceptable with the
fewest block executions (Dr.LLM), by a real UCT tree search, and the reference's chain of random edits.

Plans are edited from the full plan: skip one block, skip two consecutive blocks, or repeat a block (at
most 2L executions). A simulation expands one new child (progressive widening, so nodes branch), scores its
plan after a short random rollout, and back-propagates the reward
``acceptable + soft_weight * soft - length_penalty * executions / L``. What "acceptable" means per scoring
kind is `tasks.scoring.judge` (multiple choice: right, or the full model's answer kept; fidelity: the full
model's own answer kept within a margin).

A search is a generator (`steps`) that yields the plans it wants scored and receives their outcomes, so
`search_many` runs the searches of many examples in lockstep and scores all their plans in shared batches
(`PlanScorer`): on a GPU, hundreds of plans of different examples per forward.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field

from .plan_scoring import PlanScorer
from .tasks.scoring import DEFAULT_CRITERIA, Criteria, Encoded, Outcome, PlanScore, judge

Plan = tuple[int, ...]
Action = tuple[str, int]
Steps = Generator[list[Plan], list[Outcome], None]


@dataclass
class SearchConfig:
    simulations: int = 32  # plan evaluations per example (the root included)
    c_explore: float = 1.8  # UCT exploration constant (reference default)
    length_penalty: float = 0.5  # reward = acceptable + soft_weight * soft - length_penalty * executions / L
    soft_weight: float = 0.25
    widen: float = 0.5  # a node may have ceil(widen * sqrt(visits)) children
    rollout: int = 6  # a simulation scores its new node's plan after 0..rollout further random edits
    batch: int = 8  # plans one search asks for at a time (virtual visits keep them apart)
    stop_saved: int = 0  # early stop once an acceptable plan saves this many executions (0: never)
    stop_on_fix: bool = False  # early stop: a right plan for an example the full model gets wrong
    seed: int = 0
    order: tuple[int, ...] = ()  # method "static": blocks in the order they may be skipped (least important first)
    max_skip: int = 8  # method "static": the longest prefix of `order` tried
    exhaustive: bool = False  # method "static": score every prefix 0..max_skip (for `pool_targets`)


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
    base_correct: bool  # the full plan is right (multiple choice: the gold choice wins)
    base_soft: float
    target: Plan  # the acceptable plan with the fewest executions
    target_correct: bool  # the target is right
    target_soft: float
    evals: int
    stopped_early: bool
    best_reward: float
    seconds: float = 0.0
    base_pred: int = -1
    target_pred: int = -1
    prefix_correct: list[bool] | None = None  # exhaustive static chain: prefix k's correctness, k = 0..

    def record(self, L: int) -> dict[str, object]:
        d = asdict(self)
        d["target"] = list(self.target)
        d["target_executions"] = sum(self.target)
        d["fixed"] = self.target_correct and not self.base_correct
        d["shorter"] = sum(self.target) < L
        return d


class _Search:
    """Shared bookkeeping: scored plans, the best acceptable plan, early stops."""

    def __init__(self, L: int, cfg: SearchConfig):
        self.L, self.cfg = L, cfg
        self.rng = random.Random(cfg.seed)
        self.root_plan: Plan = (1,) * L
        self.results: dict[Plan, Outcome] = {}
        self.evals = 0
        self.early = False

    def reward(self, plan: Plan, o: Outcome) -> float:
        c = self.cfg
        return float(o.ok) + c.soft_weight * o.soft - c.length_penalty * sum(plan) / self.L

    def best(self) -> tuple[Plan, Outcome]:
        """The acceptable plan with the fewest executions (ties: the higher soft score), else the full plan."""
        ok = [(sum(p), -o.soft, p) for p, o in self.results.items() if o.ok]
        if not ok:
            return self.root_plan, self.results[self.root_plan]
        p = min(ok)[2]
        return p, self.results[p]

    def done(self) -> bool:
        base = self.results[self.root_plan]
        plan, o = self.best()
        if not o.ok:
            return False
        if self.cfg.stop_on_fix and not base.correct:
            return True
        return self.cfg.stop_saved > 0 and sum(plan) <= self.L - self.cfg.stop_saved

    def ask(self, plans: list[Plan]) -> Generator[list[Plan], list[Outcome], list[Outcome]]:
        """Yield the not yet scored plans; return the outcomes of all `plans`."""
        new = list(dict.fromkeys(p for p in plans if p not in self.results))
        if new:
            got = yield new
            for p, o in zip(new, got, strict=True):
                self.results[p] = o
            self.evals += len(new)
        return [self.results[p] for p in plans]

    def result(self, seconds: float) -> SearchResult:
        base = self.results[self.root_plan]
        plan, o = self.best()
        best_r = max(self.reward(p, q) for p, q in self.results.items())
        return SearchResult(base.correct, base.soft, plan, o.correct, o.soft, self.evals, self.early, best_r,
                            seconds, base.pred, o.pred)

    def steps(self) -> Steps:
        raise NotImplementedError


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
            if p not in self.results:
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

    def steps(self) -> Steps:
        root = self._new_node(self.root_plan, None)
        root.visits = 1
        (o,) = yield from self.ask([self.root_plan])
        root.total = self.reward(self.root_plan, o)
        stale = 0
        while self.evals < self.cfg.simulations and not self.done() and stale < 3:
            k = min(self.cfg.batch, self.cfg.simulations - self.evals)
            leaves = [n for n in (self._select(root) for _ in range(k)) if n is not None]
            if not leaves:
                break
            scored = [self._rollout(n.plan) for n in leaves]
            before = self.evals
            outs = yield from self.ask(scored)
            stale = stale + 1 if self.evals == before else 0
            for leaf, plan, o in zip(leaves, scored, outs, strict=True):
                r = self.reward(plan, o)
                n: Node | None = leaf
                while n is not None:
                    n.total += r
                    n = n.parent
        self.early = self.evals < self.cfg.simulations and self.done()


class RandomChain(_Search):
    """The reference code's "MCTS": every node has one child, a random edit of its parent."""

    def steps(self) -> Steps:
        yield from self.ask([self.root_plan])
        chain: list[Plan] = []
        plan = self.root_plan
        while len(chain) < self.cfg.simulations - 1:
            acts = actions(plan)
            plan = apply_action(plan, self.rng.choice(acts)) if acts else self.root_plan
            chain.append(plan)
        for i in range(0, len(chain), self.cfg.batch):
            if self.done():
                self.early = True
                break
            yield from self.ask(chain[i:i + self.cfg.batch])


class StaticChain(_Search):
    """Nested plans along a fixed skip order: plan k skips the first k blocks of `cfg.order`
    (k = 0 .. max_skip). Bisection finds the longest acceptable prefix in about log2(max_skip + 1) + 1 plan
    evaluations, assuming acceptability is monotone in k (a boundary is found either way).

    Why (beyond the paper): with a few dozen free-form edits per example, a four-way multiple-choice
    argmax is often kept by luck, so MCTS targets of a small model are noisy (see the shipped checkpoint's
    README). Prefixes of one order chosen on data give each example one number — how deep it can be cut —
    that routers can learn, and they nest with the `static` budget rule."""

    def plan_k(self, k: int) -> Plan:
        p = list(self.root_plan)
        for i in self.cfg.order[:k]:
            p[i] = 0
        return tuple(p)

    def deepest(self) -> int:
        return min(self.cfg.max_skip, len(self.cfg.order), self.L - 1)

    def steps(self) -> Steps:
        if not self.cfg.order:
            raise ValueError("the static search needs an order (SearchConfig.order)")
        yield from self.ask([self.root_plan])
        if self.cfg.exhaustive:
            yield from self.ask([self.plan_k(k) for k in range(1, self.deepest() + 1)])
            return
        lo, hi = 0, self.deepest() + 1  # plan lo acceptable, hi not
        while hi - lo > 1 and self.evals < self.cfg.simulations:
            mid = (lo + hi) // 2
            (o,) = yield from self.ask([self.plan_k(mid)])
            lo, hi = (mid, hi) if o.ok else (lo, mid)

    def best(self) -> tuple[Plan, Outcome]:
        """Exhaustive: the deepest prefix before the first unacceptable one (bisection's answer when
        acceptability is monotone in k). Bisection: the acceptable plan with the fewest executions."""
        if not self.cfg.exhaustive:
            return super().best()
        k = 0
        while k < self.deepest() and self.results[self.plan_k(k + 1)].ok:
            k += 1
        return self.plan_k(k), self.results[self.plan_k(k)]

    def result(self, seconds: float) -> SearchResult:
        res = super().result(seconds)
        if self.cfg.exhaustive:
            res.prefix_correct = [self.results[self.plan_k(k)].correct for k in range(self.deepest() + 1)]
        return res


def pool_targets(records: Sequence[dict], margin: float) -> tuple[list[dict], dict[str, dict[str, object]]]:
    """Pooled acceptance for multiple choice (beyond the paper): per task, every example's target becomes
    the deepest prefix k of the static order whose accuracy over the task's examples stays within `margin`
    (points) of full depth. Shallower prefixes need not qualify: their accuracies are as noisy as the
    per-example outcomes (on 448 ARC-Easy train questions prefix 1 scored 2.7 points below full and
    prefix 3 0.9 above), and only the chosen prefix becomes a target.

    Why: a four-way argmax flips under almost any cut — on the default model removing block 18 alone
    flips 19 of 400 ARC-Easy train answers to right and 19 to wrong (scripts/score_plans.py) — so whether one example "accepts" a cut is mostly noise, and
    per-example targets teach routers noise. Accuracy over a task's examples is what a cut costs.
    Applies to every task record (multiple choice and short answers) of exhaustive static-chain
    searches (`prefix_correct`); other records (fidelity prompts, whose
    per-example acceptance — keeping the full model's own answer — is not a coin flip) are returned as
    they are. Returns (records, per task: examples, accuracy per prefix in %, the chosen k).
    Raises ValueError when a task mixes prefix lengths or lacks the order."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        if r.get("kind") != "fidelity" and r.get("prefix_correct"):
            by_task.setdefault(r["task"], []).append(r)
    out = {id(r): r for r in records}
    report: dict[str, dict[str, object]] = {}
    for task, rs in sorted(by_task.items()):
        depth = {len(r["prefix_correct"]) for r in rs}
        if len(depth) != 1:
            raise ValueError(f"task {task}: records with different prefix lengths {sorted(depth)}")
        n_k = depth.pop()
        acc = [100 * sum(bool(r["prefix_correct"][k]) for r in rs) / len(rs) for k in range(n_k)]
        k = max(j for j in range(n_k) if acc[j] >= acc[0] - margin)
        for r in rs:
            order = r.get("config", {}).get("order")
            if not order or len(order) < k:
                raise ValueError(f"task {task}: record {r['id']} has no static order of length {k}")
            L = len(r["target"])
            target = [1] * L
            for i in order[:k]:
                target[i] = 0
            new = {**r, "target": target, "target_executions": sum(target), "target_correct":
                   bool(r["prefix_correct"][k]), "shorter": sum(target) < L, "pooled": k}
            new["fixed"] = new["target_correct"] and not r["base_correct"]
            out[id(r)] = new
        report[task] = {"examples": len(rs), "accuracy_per_prefix": [round(a, 2) for a in acc], "k": k,
                        "margin": margin}
    return [out[id(r)] for r in records], report


METHODS: dict[str, type[_Search]] = {"mcts": MCTS, "chain": RandomChain, "static": StaticChain}


def search_many(scorer: PlanScorer, encs: Sequence[Encoded], cfg: SearchConfig, method: str = "mcts",
                seeds: Sequence[int] | None = None, crit: Criteria = DEFAULT_CRITERIA,
                on_done: Callable[[int, SearchResult], None] | None = None) -> list[SearchResult]:
    """Search every example of `encs` in lockstep; each round scores all pending plans in shared batches.
    seeds: one per example (default cfg.seed). on_done(i, result) is called as each search finishes."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}")
    n = len(encs)
    searches = []
    for i in range(n):
        c = SearchConfig(**{**asdict(cfg), "seed": seeds[i] if seeds is not None else cfg.seed})
        searches.append(METHODS[method](scorer.L, c))
    gens = [s.steps() for s in searches]
    seconds = [0.0] * n  # each example's share of the scoring time (by its share of the scored plans)
    full: list[PlanScore | None] = [None] * n
    results: list[SearchResult | None] = [None] * n
    pending: dict[int, list[Plan]] = {}

    def finish(i: int) -> None:
        results[i] = searches[i].result(seconds[i])
        if on_done is not None:
            on_done(i, results[i])  # type: ignore[arg-type]

    for i, g in enumerate(gens):
        pending[i] = next(g)
    while pending:
        items = [(encs[i], p) for i, ps in pending.items() for p in ps]
        t = time.perf_counter()
        scores = iter(scorer.score(items))
        per_plan = (time.perf_counter() - t) / max(1, len(items))
        nxt: dict[int, list[Plan]] = {}
        for i, ps in pending.items():
            seconds[i] += per_plan * len(ps)
            got = [next(scores) for _ in ps]
            if full[i] is None:  # the first request of every search is the full plan alone
                full[i] = got[0]
            ref = full[i]
            assert ref is not None
            try:
                nxt[i] = gens[i].send([judge(encs[i], s, ref, crit) for s in got])
            except StopIteration:
                finish(i)
        pending = nxt
    return results  # type: ignore[return-value]


def search_example(scorer: PlanScorer, enc: Encoded, cfg: SearchConfig, method: str = "mcts",
                   crit: Criteria = DEFAULT_CRITERIA) -> SearchResult:
    return search_many(scorer, [enc], cfg, method, crit=crit)[0]


def summarize(records: list[dict], L: int) -> dict[str, float]:
    """Search statistics over JSONL records: shares with a shorter acceptable plan and of wrong examples
    fixed, mean target executions, plan evaluations per second."""
    n = max(len(records), 1)
    wrong = [r for r in records if not r["base_correct"]]
    secs = sum(r["seconds"] for r in records)
    evals = sum(r["evals"] for r in records)
    return {"examples": len(records), "method": records[0].get("method", "?") if records else "?",
            "base_accuracy": sum(r["base_correct"] for r in records) / n,
            "target_correct": sum(r["target_correct"] for r in records) / n,
            "shorter_correct": sum(r["shorter"] for r in records) / n,
            "wrong_fixed": sum(r["fixed"] for r in wrong) / max(len(wrong), 1),
            "mean_target_executions": sum(r["target_executions"] for r in records) / n,
            "mean_saved_when_correct": sum(L - r["target_executions"] for r in records if r["target_correct"])
            / max(1, sum(r["target_correct"] for r in records)),
            "evals": evals, "evals_per_s": evals / max(secs, 1e-9)}

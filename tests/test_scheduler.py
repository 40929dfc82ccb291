"""Plan-aware admission (BatchGenerator scheduler="plan"): rows whose plans share skipped blocks are admitted
together, aging bounds every wait, a budgeted request's expected plan follows the static budget order, and
the tokens are those of each request run alone (scheduling changes only who runs when)."""

from __future__ import annotations

import time

import pytest
import torch
from tiny import random_routers, tiny_model

from routing import generation
from routing.generation import BatchGenerator, GenerationRequest, length_groups
from routing.plan import LayerPlan
from routing.planner import PlanRequest
from routing.policy import RoutingPolicy
from routing.routers import RouterPlanner
from routing.sampling import SamplingParams

SKIP_MID = LayerPlan((1, 1, 0, 0, 0, 1))
FULL = LayerPlan.full(6)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def alone(model, req: GenerationRequest) -> list[int]:  # noqa: ANN001
    g = BatchGenerator(model, max_batch=1)
    s = g.submit(req)
    g.run_to_completion()
    return s.generated


def admitted_order(scheduler: str, max_wait_s: float = 60.0) -> tuple[list[int], list[list[int]], list]:
    """Two rows; a long-running SKIP_MID row holds one of them while FULL and SKIP_MID requests queue."""
    model = tiny_model("llama")
    gen = BatchGenerator(model, max_batch=2, scheduler=scheduler, max_wait_s=max_wait_s)
    reqs = [GenerationRequest([3, 4, 5], greedy(12), plan=SKIP_MID)]
    reqs += [GenerationRequest([7 + i, 2, 9], greedy(3), plan=p)
             for i, p in enumerate((FULL, FULL, SKIP_MID, SKIP_MID))]
    seqs = [gen.submit(reqs[0])]
    gen.step()  # the long row is running
    seqs += [gen.submit(r) for r in reqs[1:]]
    order: list[int] = []
    while gen.has_work():
        gen.step()
        order += [i for i, s in enumerate(seqs) if s.t_admit is not None and i not in order and i]
    return order, [s.generated for s in seqs], [alone(model, r) for r in reqs]


def test_plan_scheduler_admits_rows_that_share_the_running_skips_first() -> None:
    order, got, solo = admitted_order("plan")
    assert order == [3, 4, 1, 2]  # the SKIP_MID ones join the SKIP_MID row; the FULL ones after
    assert got == solo


def test_fifo_scheduler_and_aging_keep_arrival_order() -> None:
    order, got, solo = admitted_order("fifo")
    assert order == [1, 2, 3, 4]
    assert got == solo
    aged, got, _ = admitted_order("plan", max_wait_s=0.0)  # everyone has waited "too long": arrival order
    assert aged == [1, 2, 3, 4] and got == solo


def test_a_waiting_sequence_past_max_wait_goes_first() -> None:
    model = tiny_model("llama")
    gen = BatchGenerator(model, max_batch=1, scheduler="plan", max_wait_s=5.0)
    run = gen.submit(GenerationRequest([1, 2], greedy(1), plan=SKIP_MID))
    gen.step()
    old = gen.submit(GenerationRequest([3, 2], greedy(1), plan=FULL))
    new = gen.submit(GenerationRequest([4, 2], greedy(1), plan=SKIP_MID))
    old.t_submit -= 10  # it has waited past max_wait_s
    assert gen._plan_order([old, new], 1) == [old, new]
    old.t_submit = new.t_submit = time.monotonic()
    assert gen._plan_order([old, new], 1) == [new, old]
    gen.run_to_completion()
    assert run.finished and old.finished and new.finished


def test_expected_plan_of_a_budgeted_request_follows_the_static_order() -> None:
    model = tiny_model("llama")
    policy = RoutingPolicy(budget_rule="static", budget_order=(3, 1, 4, 0, 2, 5))
    planner = RouterPlanner(random_routers(model, 1), policy)
    assert planner.expected_plan(PlanRequest(budget=0.5), 6).counts == (1, 0, 1, 0, 0, 1)
    assert planner.expected_plan(PlanRequest(routing="full", budget=0.5), 6) == FULL
    assert planner.expected_plan(PlanRequest(plan=SKIP_MID), 6) == SKIP_MID
    assert planner.expected_plan(PlanRequest(), 6) == FULL  # the routers' free skips are unknown before
    margin = RouterPlanner(random_routers(model, 1), RoutingPolicy(budget_rule="margin"))
    assert margin.expected_plan(PlanRequest(budget=0.5), 6) == FULL


def test_unknown_scheduler_is_refused() -> None:
    with pytest.raises(ValueError, match="scheduler"):
        BatchGenerator(tiny_model("llama"), scheduler="lifo")


def test_length_groups_split_only_where_padding_costs_more_than_a_call() -> None:
    assert length_groups([35, 5, 8, 6], 16) == [[1, 3, 2], [0]]
    assert length_groups([35, 5, 8, 6], 1000) == [[1, 3, 2, 0]]  # a call costs more than any padding
    assert length_groups([7], 16) == [[0]]
    lengths = [3, 40, 41, 2, 9, 40]
    groups = length_groups(lengths, 8)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in zip(groups, groups[1:], strict=False))


def test_prefill_in_length_groups_equals_each_request_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of very different lengths admitted together are prefilled in several calls (rows assigned in
    call order); every row still generates exactly what it generates alone, routers deciding its plan."""
    monkeypatch.setitem(generation.PREFILL_CALL_TOKENS, "cpu", 2)
    model = tiny_model("qwen3")
    planner = RouterPlanner(random_routers(model, 3))
    rng = torch.Generator().manual_seed(5)
    reqs = [GenerationRequest(torch.randint(0, 96, (n,), generator=rng).tolist(), greedy(5),
                              budget=b) for n, b in ((3, None), (30, 0.7), (4, 0.5), (28, None))]
    gen = BatchGenerator(model, max_batch=4, planner=planner)
    seqs = [gen.submit(r) for r in reqs]
    calls = []
    orig = planner.prefill
    monkeypatch.setattr(planner, "prefill", lambda ex, tokens, *a, **k: calls.append(tokens.shape) or
                        orig(ex, tokens, *a, **k))
    gen.run_to_completion()
    assert len(calls) == 2
    for s, r in zip(seqs, reqs, strict=True):
        solo = BatchGenerator(model, max_batch=1, planner=RouterPlanner(planner.routers))
        one = solo.submit(r)
        solo.run_to_completion()
        assert s.generated == one.generated and s.plan == one.plan

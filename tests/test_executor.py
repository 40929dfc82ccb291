"""The routed executor against independent references, on every supported architecture."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import ARCHS, ATOL, DEVICE, LOW_PRECISION, reference_logits, tiny_model

from routing.executor import RoutedExecutor
from routing.generation import BatchGenerator, GenerationRequest
from routing.plan import LayerPlan
from routing.sampling import SamplingParams

# token-for-token comparisons need float32: in half precision a near tie may flip a greedy choice
fp32_only = pytest.mark.skipif(LOW_PRECISION, reason="compares sampled tokens; needs float32")


def random_plan(rng: random.Random, n: int) -> LayerPlan:
    counts = [rng.choice((0, 1, 1, 2)) for _ in range(n)]
    if sum(counts) == 0:
        counts[0] = 1
    return LayerPlan(tuple(counts))


def zeros(b: int) -> torch.Tensor:
    return torch.zeros(b, dtype=torch.long, device=DEVICE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_full_plan_equals_transformers_forward(arch: str, attn: str) -> None:
    model = tiny_model(arch, attn=attn)
    tokens = torch.randint(0, 96, (2, 11))
    with torch.inference_mode():
        ref = model.hf(tokens.to(DEVICE), use_cache=False).logits
    ex = RoutedExecutor(model, max_batch=2, attn_impl=attn)
    out = ex.forward(tokens, zeros(2), plans=torch.ones(2, 6, dtype=torch.long), all_logits=True)
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_skip_and_repeat_plans_equal_transformers_on_the_execution_order(arch: str, attn: str) -> None:
    model = tiny_model(arch, attn=attn)
    rng = random.Random(1)
    ex = RoutedExecutor(model, attn_impl=attn)
    for _ in range(4):
        plan = random_plan(rng, 6)
        tokens = torch.randint(0, 96, (1, 9))
        out = ex.forward(tokens, zeros(1), plans=torch.tensor([plan.counts]), all_logits=True)
        torch.testing.assert_close(out.logits, reference_logits(model, plan, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_equals_no_cache_recompute(arch: str, attn: str) -> None:
    """Prefill + token-by-token decode with the slot cache gives the logits of recomputing everything."""
    model = tiny_model(arch, attn=attn)
    rng = random.Random(2)
    for trial in range(6):
        plan = random_plan(rng, 6)
        if trial == 0:
            plan = LayerPlan((2, 2, 0, 2, 1, 2))  # many repeats: each needs its own cache slot
        seq = torch.randint(0, 96, (1, 14))
        prompt = 5
        ex = RoutedExecutor(model, attn_impl=attn, capacity=8)  # small capacity: exercises cache growth
        plans = torch.tensor([plan.counts])
        out = ex.forward(seq[:, :prompt], zeros(1), plans=plans)
        cached = [out.logits[0]]
        for t in range(prompt, seq.shape[1]):
            cached.append(ex.forward(seq[:, t : t + 1], torch.tensor([t]), plans=plans).logits[0])
        fresh = RoutedExecutor(model, attn_impl=attn)
        ref = fresh.forward(seq, zeros(1), plans=plans, all_logits=True).logits[0, prompt - 1 :]
        torch.testing.assert_close(torch.stack(cached), ref, atol=ATOL, rtol=0)


def test_shared_slot_for_a_repeat_would_be_wrong() -> None:
    """Guard for the reference implementation's bug: the repeat's keys differ from the first pass's."""
    model = tiny_model("llama")
    ex = RoutedExecutor(model)
    ex.forward(torch.randint(0, 96, (1, 6)), zeros(1), plans=torch.tensor([[2, 1, 1, 1, 1, 1]]))
    rows = slice(0, 1)
    assert not torch.allclose(ex.cache.read(0, 0, rows, 6)[0], ex.cache.read(0, 1, rows, 6)[0])
    assert ex.cache.has_slot(1) and not ex.cache.has_slot(3)  # block 1 runs once: no repeat slot


@fp32_only
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_rows_alone(arch: str) -> None:
    model = tiny_model(arch)
    rng = random.Random(3)
    plans = [random_plan(rng, 6) for _ in range(3)] + [LayerPlan.full(6)]
    prompts = [[rng.randrange(96) for _ in range(n)] for n in (3, 9, 1, 6)]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)

    def run(indices: list[int]) -> dict[int, list[float]]:
        gen = BatchGenerator(model, max_batch=len(indices))
        seqs = {i: gen.submit(GenerationRequest(prompts[i], params, plan=plans[i])) for i in indices}
        gen.run_to_completion()
        return {i: (s.generated, [lp.logprob for lp in s.logprobs]) for i, s in seqs.items()}

    together = run([0, 1, 2, 3])
    for i in range(4):
        alone = run([i])[i]
        assert together[i][0] == alone[0]
        torch.testing.assert_close(torch.tensor(together[i][1]), torch.tensor(alone[1]), atol=ATOL, rtol=0)


@fp32_only
def test_rows_join_and_leave_mid_generation() -> None:
    """Continuous batching: a row admitted while others decode, and rows finishing at different steps,
    still get exactly their solo results (rows are compacted in the cache as others leave)."""
    model = tiny_model("qwen2")
    rng = random.Random(4)
    reqs = [GenerationRequest([rng.randrange(96) for _ in range(n)],
                              SamplingParams(max_tokens=m, temperature=0, logprobs=0, ignore_eos=True),
                              plan=random_plan(rng, 6)) for n, m in ((4, 3), (7, 8), (2, 5))]
    solo = []
    for r in reqs:
        g = BatchGenerator(model, max_batch=1)
        s = g.submit(r)
        g.run_to_completion()
        solo.append(s.generated)
    gen = BatchGenerator(model, max_batch=3)
    first = [gen.submit(reqs[0]), gen.submit(reqs[1])]
    gen.step()
    gen.step()
    late = gen.submit(reqs[2])
    gen.run_to_completion()
    assert [s.generated for s in (*first, late)] == solo


@fp32_only
def test_no_cache_generation_equals_cached() -> None:
    model = tiny_model("qwen3")
    plan = LayerPlan((1, 2, 0, 1, 2, 1))
    req = dict(prompt_ids=[5, 9, 3, 77], params=SamplingParams(max_tokens=8, temperature=0, logprobs=0,
                                                                ignore_eos=True), plan=plan)
    out = []
    for no_cache in (False, True):
        g = BatchGenerator(model, max_batch=1, no_cache=no_cache)
        s = g.submit(GenerationRequest(**req))
        g.run_to_completion()
        out.append((s.generated, [lp.logprob for lp in s.logprobs]))
    assert out[0][0] == out[1][0]
    torch.testing.assert_close(torch.tensor(out[0][1]), torch.tensor(out[1][1]), atol=ATOL, rtol=0)


@fp32_only
def test_sampling_is_seeded_per_request() -> None:
    model = tiny_model("llama")
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7, ignore_eos=True)

    def sample(batch_with_other: bool) -> list[int]:
        g = BatchGenerator(model, max_batch=2)
        s = g.submit(GenerationRequest([1, 2, 3], p))
        if batch_with_other:
            g.submit(GenerationRequest([4, 5], SamplingParams(max_tokens=10, temperature=1.0, seed=1)))
        g.run_to_completion()
        return s.generated

    assert sample(False) == sample(True)


@pytest.mark.parametrize("bad", [(1, 1), (1, 3, 1, 1, 1, 1), (1, -1, 1, 1, 1, 1), (1.0, 1, 1, 1, 1, 1), ()])
def test_invalid_plans_raise_value_error(bad: tuple) -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        LayerPlan(bad).check_length(model.spec.n_layers)


def test_plan_accounting() -> None:
    p = LayerPlan.parse("1,2,0,1")
    assert (p.executions, p.skipped, p.repeated) == (4, 1, 1)
    assert p.execution_order == (0, 1, 1, 3)
    with pytest.raises(ValueError, match="layers"):
        LayerPlan.parse("1,1", n_layers=3)
    with pytest.raises(ValueError):
        LayerPlan.parse("1,x")

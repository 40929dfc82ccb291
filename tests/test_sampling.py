"""Batched sampling (routing.sampling): row independence, safety of extreme parameters, 64-bit seeds,
top-k/top-p/min-p semantics against a direct per-row reference, and the exact fallback of top-p."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.sampling import SampleRow, SamplingParams, sample, uniform

# every device-dependent test runs on CPU and, where there is one, on CUDA (skipped, not dropped, without)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def logits(b: int, V: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


def row(seed: int = 0, step: int = 0, **kw: object) -> SampleRow:
    return SampleRow(SamplingParams(**kw), seed, step)  # type: ignore[arg-type]


def reference(x: torch.Tensor, p: SamplingParams, u: float) -> int:
    """One row, written the plain way: temperature, full sort, top-k, top-p, min-p, inverse CDF (in id order
    when nothing truncates)."""
    z = x.double() / p.temperature
    probs = torch.softmax(z, -1)
    sp, order = torch.sort(probs, descending=True, stable=True)
    if not p.truncates:
        sp, order = probs, torch.arange(len(probs))
    keep = torch.ones_like(sp, dtype=torch.bool)
    if p.top_k > 0:
        keep[p.top_k:] = False
    keep &= (sp.cumsum(0) - sp) < p.top_p
    keep &= sp >= p.min_p * sp[0]
    keep[0] = True
    w = sp * keep
    cdf = w.cumsum(0)
    j = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True))
    return int(order[min(j, len(sp) - 1)])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_rows_are_independent(device: str) -> None:
    """A row's token and logprobs do not depend on the rows sampled with it."""
    x = logits(6, 500).to(device)
    rows = [row(1, 0, temperature=0, logprobs=3), row(2, 5, temperature=0.7, top_p=0.9),
            row(3, 1, temperature=1.0, top_k=5, repetition_penalty=1.3),
            row(4, 2, temperature=1.2, min_p=0.05, logprobs=2), row(5, 0, temperature=1.0),
            row(6, 9, temperature=0.5, top_k=40, top_p=0.8)]
    rows[2].history = [1, 2, 3, 400]
    together = sample(x, rows)
    for i, r in enumerate(rows):
        alone = sample(x[i:i + 1], [r])[0]
        assert alone.token_id == together[i].token_id
        assert alone.logprob == pytest.approx(together[i].logprob, abs=1e-5) if alone.logprob is not None else True
        assert [t for t, _ in alone.top] == [t for t, _ in together[i].top]


@pytest.mark.parametrize("device", DEVICES)
def test_truncated_sampling_matches_reference(device: str) -> None:
    """top-k / top-p / min-p over the candidates equal a plain full-sort implementation, step by step."""
    x = logits(1, 300, seed=4)
    xd = x.to(device)
    for kw in (dict(top_p=0.9), dict(top_k=7), dict(top_p=0.5, top_k=20), dict(temperature=0.6, top_p=0.95),
               dict(min_p=0.1), dict(temperature=1.5)):
        p = SamplingParams(**kw)  # type: ignore[arg-type]
        for step in range(40):
            got = sample(xd, [SampleRow(p, 11, step)])[0].token_id
            assert got == reference(x[0], p, uniform(11, step)), (kw, step)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_distribution_falls_back_to_the_exact_path(device: str) -> None:
    """When top-p keeps more tokens than the candidates, the result equals sampling over everything."""
    x = logits(2, 2000, seed=5, scale=0.1)  # nearly flat: top_p 0.95 keeps ~1900 tokens
    p = SamplingParams(top_p=0.95)
    for step in range(20):
        rows = [SampleRow(p, 3, step), SampleRow(p, 4, step)]
        few = sample(x.to(device), rows, candidates=16)
        every = sample(x.to(device), rows, candidates=2000)
        assert [s.token_id for s in few] == [s.token_id for s in every]
        assert few[0].token_id == reference(x[0], p, uniform(3, step))


def test_sampled_frequencies_follow_the_distribution() -> None:
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    n = 4000
    counts = torch.zeros(5)
    for seed in range(n):
        counts[sample(x, [row(seed)])[0].token_id] += 1
    expected = torch.softmax(x[0], -1) * n
    assert counts[4] == 0
    assert torch.all((counts[:4] - expected[:4]).abs() < 4 * expected[:4].sqrt() + 5)


def test_64_bit_seeds() -> None:
    """Seeds differing only above the low 32 bits give different streams; equal seeds reproduce."""
    seeds = [1, 2**32 + 1, 2**40 + 1, 2**63 + 1]
    streams = [[uniform(s, k) for k in range(8)] for s in seeds]
    assert len({tuple(s) for s in streams}) == len(seeds)
    assert streams[0] == [uniform(1, k) for k in range(8)]
    x = logits(1, 1000, scale=0.5)
    toks = [[sample(x, [row(s, k)])[0].token_id for k in range(10)] for s in seeds]
    assert len({tuple(t) for t in toks}) == len(seeds)


EXTREMES = [dict(temperature=1e-38), dict(temperature=1e-40, top_k=1), dict(top_p=1e-300),
            dict(repetition_penalty=1e-40), dict(repetition_penalty=5e-324), dict(repetition_penalty=1e300),
            dict(temperature=1e300, top_p=0.5), dict(temperature=2.0, min_p=1.0), dict(top_k=1, top_p=1e-9)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", EXTREMES)
def test_extreme_parameters_give_a_token_and_leave_other_rows_alone(kw: dict, device: str) -> None:
    x = logits(2, 400, seed=6).to(device)
    bad = SampleRow(SamplingParams(**kw, logprobs=2), 9, 0, history=[1, 2, 3])  # type: ignore[arg-type]
    greedy = row(0, 0, temperature=0, logprobs=1)
    out = sample(x, [bad, greedy])
    assert out[0].error is None and 0 <= out[0].token_id < 400
    assert math.isfinite(out[0].logprob)  # type: ignore[arg-type]
    assert out[1].token_id == int(x[1].argmax())


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_temperature_and_top_p_are_greedy(device: str) -> None:
    x = logits(1, 400, seed=8).to(device)
    for kw in (dict(temperature=1e-38), dict(top_p=1e-300), dict(top_k=1)):
        assert sample(x, [row(3, **kw)])[0].token_id == int(x[0].argmax())  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_row_fails_alone(device: str) -> None:
    x = logits(3, 100)
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    x = x.to(device)
    out = sample(x, [row(temperature=0), row(temperature=1.0), row(temperature=0.8, top_p=0.9)])
    assert out[0].error is None and out[0].token_id == int(x[0].argmax())
    assert out[1].error and out[1].token_id == -1
    assert out[2].error and out[2].token_id == -1


@pytest.mark.parametrize("device", DEVICES)
def test_blocked_tokens_and_repetition_penalty(device: str) -> None:
    x = torch.tensor([[5.0, 4.0, 3.0, -1.0]], device=device)
    assert sample(x, [SampleRow(SamplingParams(temperature=0), 0, 0, blocked=(0,))])[0].token_id == 1
    pen = SampleRow(SamplingParams(temperature=0, repetition_penalty=2.0), 0, 0, history=[0, 1])
    assert sample(x, [pen])[0].token_id == 2  # 5/2 and 4/2 fall below 3
    # logprobs are reported from the raw logits
    lp = sample(x, [SampleRow(SamplingParams(temperature=0, logprobs=1), 0, 0, blocked=(0,))])[0]
    assert lp.logprob == pytest.approx(float(torch.log_softmax(x[0].cpu(), -1)[1]), abs=1e-6)
    assert lp.top[0][0] == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_parameters_are_refused(value: float) -> None:
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})


@settings(max_examples=60, deadline=None)
@given(temperature=st.floats(0, 1e30), top_p=st.floats(1e-300, 1), top_k=st.integers(-1, 500),
       min_p=st.floats(0, 1), penalty=st.floats(1e-300, 1e300), seed=st.integers(0, 2**64 - 1))
def test_any_valid_parameters_sample_a_real_token(temperature: float, top_p: float, top_k: int, min_p: float,
                                                  penalty: float, seed: int) -> None:
    x = logits(2, 300, seed=seed % 1000)
    p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=penalty,
                       logprobs=3)
    out = sample(x, [SampleRow(p, seed, 3, history=[5, 6, 7]), row(temperature=0)])
    assert out[0].error is None and 0 <= out[0].token_id < 300
    assert out[1].token_id == int(x[1].argmax())

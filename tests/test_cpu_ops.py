"""The native per-token executor operations (routing/cpu_ops.c) against torch, and where they step aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routing import cpu_ops, native
from routing.fused import rms_norm

needs_native = pytest.mark.skipif(native.load() is None, reason="no C compiler: torch's kernels run")


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (3, 13), (1, 5), (4, 1, 8)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.5])
def test_native_rms_norm_equals_torch(shape: tuple[int, ...], eps: float) -> None:
    """Widths that are and are not multiples of the 8 partial sums; a large eps; rows of large and small
    magnitude."""
    torch.manual_seed(shape[-1])
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])
    w = torch.randn(shape[-1])
    got = cpu_ops.rms_norm(x, w, eps)
    assert got is not None and got.shape == x.shape and got.data_ptr() != x.data_ptr()
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), w, eps), atol=1e-6, rtol=2e-6)


@needs_native
def test_the_executor_norm_takes_the_native_call_for_float32_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = cpu_ops.rms_norm
    monkeypatch.setattr(cpu_ops, "rms_norm", lambda *a: calls.append(a) or real(*a))
    x, w = torch.randn(2, 3, 16), torch.randn(16)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6), atol=1e-6, rtol=2e-6)
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["bfloat16", "non-contiguous", "grad", "too large", "weight shape", "empty",
                                  "weight dtype"])
def test_torch_runs_where_the_native_call_does_not_apply(case: str) -> None:
    x, w = torch.randn(4, 16), torch.randn(16)
    if case == "bfloat16":
        x = x.bfloat16()
    elif case == "non-contiguous":
        x = torch.randn(16, 4).t()
    elif case == "grad":
        x.requires_grad_(True)
    elif case == "too large":
        x = torch.randn(cpu_ops.MAX_NATIVE_ELEMENTS // 16 + 1, 16)
    elif case == "weight shape":
        w = torch.randn(4, 4)
    elif case == "empty":
        x = torch.randn(0, 16)
    else:
        w = w.double()
    assert cpu_ops.rms_norm(x, w, 1e-6) is None
    if case not in ("weight shape", "weight dtype"):  # the executor's norm still works through torch
        ref = w * F.rms_norm(x.float(), (16,), None, 1e-6).to(x.dtype) if case == "bfloat16" \
            else F.rms_norm(x, (16,), w, 1e-6)
        torch.testing.assert_close(rms_norm(x, w, 1e-6), ref)


def test_without_the_native_library_torch_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "load", lambda: None)
    x, w = torch.randn(3, 16), torch.randn(16)
    assert cpu_ops.rms_norm(x, w, 1e-6) is None
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))


def _cache_views(b: int, K: int, S: int, D: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    slot = torch.randn(b, 2 * K, cap, D)  # the KV cache's layout: keys then values per row, `cap` positions
    return slot[:, :K, :S], slot[:, K:, :S]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@needs_native
@pytest.mark.parametrize(("b", "H", "K", "S", "D"), [(1, 9, 3, 70, 64), (3, 4, 4, 17, 8), (2, 6, 2, 1, 12),
                                                      (4, 8, 2, 3000, 64), (2, 2, 1, 33, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_native_decode_attention_equals_sdpa(b: int, H: int, K: int, S: int, D: int, masked: bool) -> None:
    """Grouped and plain heads, one key, long caches (shared among threads), widths that are not multiples of
    8, cache views (strided rows and heads), a query that is a view of the fused QKV output, per-row masks."""
    torch.manual_seed(S + D)
    k, v = _cache_views(b, K, S, D, cap=S + 7)
    qkv = torch.randn(b, 1, H + 2 * K, D)
    q = qkv[:, :, :H].transpose(1, 2)  # [b, H, 1, D], as the executor passes it
    mask = None
    if masked:
        visible = torch.randint(1, S + 1, (b,))
        mask = (torch.arange(S)[None, :] < visible[:, None])[:, None, None, :]
    got = cpu_ops.decode_attention(q, k, v, mask, 0.125)
    assert got is not None and got.shape == (b, H, 1, D)
    torch.testing.assert_close(got, _sdpa(q, k, v, mask, 0.125), atol=2e-6, rtol=2e-5)


@needs_native
def test_native_decode_attention_of_a_row_with_no_visible_key_is_zero() -> None:
    k, v = _cache_views(2, 1, 5, 8, cap=5)
    q = torch.randn(2, 2, 1, 8)
    mask = torch.tensor([[True] * 5, [False] * 5])[:, None, None, :]
    got = cpu_ops.decode_attention(q, k, v, mask, 1.0)
    assert got is not None and torch.equal(got[1], torch.zeros(2, 1, 8))
    torch.testing.assert_close(got[:1], _sdpa(q[:1], k[:1], v[:1], None, 1.0))


@pytest.mark.parametrize("case", ["prefill", "bfloat16", "heads", "grad", "mask shape", "strided dim"])
def test_torch_attends_where_the_native_call_does_not_apply(case: str) -> None:
    q, (k, v) = torch.randn(2, 4, 1, 8), _cache_views(2, 2, 6, 8, cap=6)
    mask = None
    if case == "prefill":
        q = torch.randn(2, 4, 3, 8)
    elif case == "bfloat16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    elif case == "heads":
        q = torch.randn(2, 3, 1, 8)
    elif case == "grad":
        q.requires_grad_(True)
    elif case == "mask shape":
        mask = torch.ones(2, 1, 2, 6, dtype=torch.bool)
    else:
        k, v = torch.randn(2, 2, 6, 16)[..., ::2], torch.randn(2, 2, 6, 16)[..., ::2]
    assert cpu_ops.decode_attention(q, k, v, mask, 0.3) is None


def test_switched_off_for_benchmarks_torch_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_ops, "enabled", False)
    q, (k, v) = torch.randn(1, 2, 1, 8), _cache_views(1, 1, 4, 8, cap=4)
    assert cpu_ops.rms_norm(torch.randn(2, 8), torch.randn(8), 1e-6) is None
    assert cpu_ops.decode_attention(q, k, v, None, 1.0) is None

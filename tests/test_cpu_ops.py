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

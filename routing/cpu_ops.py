"""Per-token executor operations in one native call (`cpu_ops.c`, in the library `routing.native` builds),
for float32 on the CPU, where torch's version runs several kernels, each cold after a block's weights.

In a batch-1 float32 decode step, `F.rms_norm` (on the CPU a composite of pow, mean, add, rsqrt and two
products) took ~7 % of the step, ~50 us per call in a profile against ~10 us for the native call
(61 calls per step on the default model). Callers fall back to torch when a function returns None.
"""

from __future__ import annotations

import torch

from . import native

# above this many elements torch's kernels (multi-threaded, vectorized) are the better choice: the native
# call runs on one thread and is meant for decode steps and short prefills
MAX_NATIVE_ELEMENTS = 1 << 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [..., d] (float32, contiguous, CPU) scaled by weight [d] (float32, contiguous): a new
    tensor shaped as x, as `torch.nn.functional.rms_norm(x, (d,), weight, eps)` (to float32 rounding); or
    None where the native call does not apply (another dtype, device or layout, more than
    MAX_NATIVE_ELEMENTS elements, autograd recording, or no native library)."""
    lib = native.load()
    if lib is None or not x.is_cpu or x.dtype is not torch.float32 or not x.is_contiguous() \
            or weight.dtype is not torch.float32 or not weight.is_cpu or not weight.is_contiguous():
        return None
    d = weight.shape[0]
    n = x.numel()
    if n > MAX_NATIVE_ELEMENTS or weight.dim() != 1 or x.shape[-1] != d or n == 0 \
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return None
    out = torch.empty_like(x)
    lib.drllm_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), n // d, d, eps)
    return out

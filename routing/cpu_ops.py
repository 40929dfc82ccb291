"""Per-token executor operations in one native call (`cpu_ops.c`, in the library `routing.native` builds),
for float32 on the CPU, where torch's version runs several kernels, each cold after a block's weights.

In a batch-1 float32 decode step (default model, 1 thread, torch profiler), `F.rms_norm` (on the CPU a
composite of pow, mean, add, rsqrt and two products) took ~7 % of the step, ~50 us per call against ~10 us
for the native call (61 calls per step), and the decode attention (`F.scaled_dot_product_attention`, one
query per row) ~3 %, ~54 us per call. Callers fall back to torch when a function returns None.
"""

from __future__ import annotations

import torch

from . import native

# False: every function returns None, so torch's kernels run (benchmarks compare both, as with Routers.fused)
enabled = True

# above this many elements torch's kernels (multi-threaded, vectorized) are the better choice: the native
# call runs on one thread and is meant for decode steps and short prefills
MAX_NATIVE_ELEMENTS = 1 << 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of x [..., d] (float32, contiguous, CPU) scaled by weight [d] (float32, contiguous): a new
    tensor shaped as x, as `torch.nn.functional.rms_norm(x, (d,), weight, eps)` (to float32 rounding); or
    None where the native call does not apply (another dtype, device or layout, more than
    MAX_NATIVE_ELEMENTS elements, autograd recording, or no native library)."""
    lib = native.load() if enabled else None
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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
    """One query per row over a KV cache, grouped-query: q [b, H, 1, D]; k, v [b, K, S, D] (views of the cache
    are fine: any strides but a contiguous last dimension); mask [b, 1, 1, S] bool (True = attend) or None
    (all S keys). Returns [b, H, 1, D] (float32, a new tensor) as `F.scaled_dot_product_attention(q, k, v,
    attn_mask=mask, scale=scale, enable_gqa=True)` computes it (to float32 rounding), or None where the
    native call does not apply (not float32 on the CPU, H not a multiple of K, autograd recording, or no
    native library). Raises MemoryError when the native call cannot allocate its scratch space."""
    lib = native.load() if enabled else None
    if lib is None or q.dtype is not torch.float32 or k.dtype is not torch.float32 or v.dtype is not torch.float32 \
            or not q.is_cpu or not k.is_cpu or not v.is_cpu:
        return None
    b, H, n, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if n != 1 or H % K or k.shape != v.shape or k.shape[0] != b or k.shape[3] != D or S == 0 \
            or q.stride(3) != 1 or k.stride(3) != 1 or k.stride() != v.stride() \
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    mask_ptr, mask_row = None, 0
    if mask is not None:
        if mask.dtype is not torch.bool or tuple(mask.shape) != (b, 1, 1, S) or mask.stride(3) != 1 or not mask.is_cpu:
            return None
        mask_ptr, mask_row = mask.data_ptr(), mask.stride(0)
    out = torch.empty(b, H, 1, D)
    ks = k.stride()
    if lib.drllm_decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), ks[0], ks[1],
                                  ks[2], mask_ptr, mask_row, out.data_ptr(), b, H, K, S, D, scale,
                                  torch.get_num_threads()):
        raise MemoryError("the native decode attention could not allocate its scratch space")
    return out

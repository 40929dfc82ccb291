"""Weight-only int8 quantization for CPU decode: per-output-channel symmetric int8 weights, float scales.

`quantize_model_(hf)` replaces every block projection and the LM head with an `Int8Linear`, in place.
The matmul is torch's CPU int8 weight-only kernel `torch.ops.aten._weight_int8pack_mm` (the kernel behind
torchao's int8 weight-only CPU path). On this machine's AVX2 CPUs the kernel is fast only with bfloat16
activations (with float32 ones it is ~10x slower than a float32 matmul), so float32 activations are cast
to bfloat16 around it; the accuracy cost is reported by `drllm bench --quantization int8`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "int8")
DEQUANT_ROWS = 32  # from this many rows per matmul on, dequantize and use the float matmul


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scale [out] float32) with weight ~= int8 * scale[:, None].

    Symmetric per-output-channel absmax scaling to [-127, 127] (LLM.int8's "vector-wise" weights, without
    outlier decomposition)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (qweight [out, in] int8 * scale [out])^T + bias -> [..., out] in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] >= DEQUANT_ROWS:
        # prefill: compute-bound, where the int8 kernel is slow; a dequantized copy costs one pass over the
        # weight and the float matmul is fast
        out = F.linear(x2, qweight.to(x.dtype) * scale.to(x.dtype)[:, None])
    elif x2.device.type == "cpu":
        act = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(act.contiguous(), qweight, scale.to(act.dtype))
        out = out.to(x.dtype)
    else:  # no fused kernel everywhere: dequantize (correct, not fast)
        out = F.linear(x2, qweight.to(x.dtype) * scale.to(x.dtype)[:, None])
    if bias is not None:
        out = out + bias
    return out.view(*shape[:-1], out.shape[-1])


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear with int8 weights (buffers `weight` [out, in] int8, `scale` [out] float32)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(linear.weight.device), s.to(linear.weight.device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_model_(hf: nn.Module, quantization: str) -> None:
    """Quantize a transformers *ForCausalLM in place: every nn.Linear of the decoder blocks and the LM head.

    The embedding table stays in float (a decode step reads one row of it); a tied LM head gets its own
    int8 copy. Raises ValueError for an unknown quantization."""
    if quantization in (None, "", "none"):
        return
    if quantization != "int8":
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
    hf.lm_head = Int8Linear.from_linear(hf.lm_head)
    hf.config.tie_word_embeddings = False

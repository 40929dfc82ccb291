"""int8 quantization for CPU decode: per-output-channel symmetric int8 weights, float scales.

`quantize_model_(hf)` replaces every block projection and the LM head with an `Int8Linear`, in place.
Matmuls of up to `PACKED_ROWS` rows (decode at small batches) run through fbgemm's dynamically quantized
linear (`torch.ops.quantized.linear_dynamic` on weights prepacked once, `prepack_int8`), one row per call:
each row's activations are quantized on their own (per tensor, so per row) to 7-bit unsigned integers (`reduce_range`, which keeps AVX2's 16-bit
vpmaddubsw accumulations from saturating) and the product accumulates in int32. Measured on this AVX2 EPYC
(1 thread, 30 distinct weights per shape so they come from memory): a 576 -> 3072 product of one row takes
124 us against 743 us in float32 and 326 us with torch's weight-only `_weight_int8pack_mm` (bfloat16
activations), which serves 5-31 rows and is the fallback where fbgemm is missing; from `DEQUANT_ROWS` rows on
(prefill) the weights are dequantized for the float matmul. The accuracy cost (activation quantization
included) is reported by `drllm bench --quantization int8`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "int8")
DEQUANT_ROWS = 32  # from this many rows per matmul on, dequantize and use the float matmul
PACKED_ROWS = 4  # up to this many rows, fbgemm's dynamic linear one row at a time; then _weight_int8pack_mm


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] float -> (int8 [out, in], scale [out] float32) with weight ~= int8 * scale[:, None].

    Symmetric per-output-channel absmax scaling to [-127, 127] (LLM.int8's "vector-wise" weights, without
    outlier decomposition)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


# the op's overload itself: calling the packet (`torch.ops.quantized.linear_dynamic`) re-checks its arguments
# for torchbind fakes in Python on every call, ~2-8 us of a 50 us one-row product (measured, this CPU)
LINEAR_DYNAMIC = torch.ops.quantized.linear_dynamic.default


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def prepack_int8(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> object | None:
    """fbgemm's packed form of qweight [out, in] int8 with per-row scale [out] (and a float bias), for
    `int8_linear`; None where fbgemm is not available (non-x86 builds) or the weight is not on the CPU."""
    if not has_fbgemm() or qweight.device.type != "cpu":
        return None
    with warnings.catch_warnings():  # torch deprecates quantized tensors; the prepacked weight is what we keep
        warnings.simplefilter("ignore", UserWarning)
        q = torch._make_per_channel_quantized_tensor(qweight, scale.double(),
                                                     torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.float())


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, packed: object | None = None) -> torch.Tensor:
    """x [..., in] @ (qweight [out, in] int8 * scale [out])^T + bias -> [..., out] in x's dtype.

    packed: `prepack_int8(qweight, scale, bias)` (the bias is inside it): decode-sized calls on float32
    activations then quantize the activations too (fbgemm's dynamic linear, see the module docstring)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if packed is not None and m <= PACKED_ROWS and x2.dtype == torch.float32:
        # one call per row: fbgemm quantizes its input per tensor, and a row's result must not depend on the
        # range of the other rows' activations
        if m == 1:
            out = LINEAR_DYNAMIC(x2, packed, True)
        else:
            out = torch.cat([LINEAR_DYNAMIC(x2[i: i + 1], packed, True) for i in range(m)])
        return out.view(*shape[:-1], out.shape[-1])
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
        self._packed: tuple[int, object | None] | None = None  # (weight's data_ptr, fbgemm pack), lazily

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, s = quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(linear.weight.device), s.to(linear.weight.device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # packed on first use (the executor packs its fused projections itself, so a served model holds
        # one pack per projection)
        ptr = self.weight.data_ptr()
        if self._packed is None or self._packed[0] != ptr:
            self._packed = (ptr, prepack_int8(self.weight, self.scale, self.bias))
        return int8_linear(x, self.weight, self.scale, self.bias, self._packed[1])

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

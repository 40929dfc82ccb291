"""Weight quantization for CPU decode: int8 (per-output-channel symmetric int8 weights, float scales) and
int4 (groups of 32 inputs, asymmetric 4-bit codes with a scale and a zero point per group, as GGUF's Q4_1).

`quantize_model_(hf, "int8")` replaces every block projection and the LM head with an `Int8Linear`, in
place; `"int4"` makes the block projections `Int4Linear` and the LM head `Int8Linear` (see `Int4Linear`).
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

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP = 32  # inputs per int4 group: GGUF's Q4_0/Q4_1 block size
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


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """weight [out, in] float -> (codes [out, in] uint8 in 0..15, scale [out, in/group], zero [out, in/group],
    float32) with weight ~= (codes - 8) * scale + zero per group of `group` consecutive inputs.

    Asymmetric min/max scaling per group, as GGUF's Q4_1 (scale = (max - min) / 15; zero, torch's int4
    kernels' zero point, is the value of code 8), so a weight that came from a Q4_1 file with the same
    groups is represented exactly (to float32 rounding). Raises ValueError when `in` is not a multiple of
    `group`."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {group}")
    g = w.view(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)
    return codes, scale, lo + 8 * scale


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [out, in], scale, zero [out, in/group]) -> weight [out, in] in `dtype`."""
    n, k = codes.shape
    g = codes.view(n, scale.shape[1], -1).to(torch.float32)
    lo = (zero - 8 * scale)[..., None]  # the value of code 0
    return torch.addcmul(lo, g, scale[..., None]).view(n, k).to(dtype)


def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch's CPU int4 kernel form of (codes, scale, zero): (packed [out, in/2] uint8, scales and zeros
    [in/group, out, 2] bfloat16), for `int4_linear`; None off the CPU or without the kernel. The bfloat16 group scales and zeros
    are what that kernel takes (with bfloat16 activations): a relative rounding of ~2^-9 per group."""
    if codes.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None  # (the CPU int4 ops came with torch 2.6; without them every matmul dequantizes)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    sz = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
    return packed, sz


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bias: torch.Tensor | None = None, packed: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
    """x [..., in] @ dequantize_int4(codes, scale, zero)^T + bias -> [..., out] in x's dtype.

    With `packed` (`pack_int4`): torch's int4 weight-only kernel (`_weight_int4pack_mm_for_cpu`) on bfloat16
    activations, which reads half a byte per weight, at any number of rows. Measured on this AMD EPYC, a
    576 -> 1536 product: one row ~54 us against int8's ~84 us and float32's ~228 us (2 threads, weights from
    memory); 49 rows (a prefill) 1.3 ms, as float32's F.linear, where dequantizing first took ~9 ms (1 thread).
    Without it (off the CPU, torch < 2.6): the weights are dequantized in x's dtype for the float matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    group = codes.shape[1] // scale.shape[1]
    if packed is not None:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed[0], group,
                                                         packed[1]).to(x.dtype)
        if bias is not None:
            out = out + bias
    else:
        out = F.linear(x2, dequantize_int4(codes, scale, zero, x.dtype), bias)
    return out.view(*shape[:-1], out.shape[-1])


class Int4Linear(nn.Module):
    """Drop-in for nn.Linear with int4 weights: buffers `codes` [out, in] uint8 (0..15), `scale` and `zero`
    [out, in/32] float32 (see `quantize_int4`), and the bias. Matmuls read the kernel's packed copy (half a
    byte per weight, built on first use; see `int4_linear`)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)
        self._packed: tuple[int, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight [out, in] (a new tensor; for inspection and tests)."""
        return dequantize_int4(self.codes, self.scale, self.zero)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        codes, scale, zero = quantize_int4(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        dev = linear.weight.device
        return cls(codes.to(dev), scale.to(dev), zero.to(dev), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ptr = self.codes.data_ptr()
        if self._packed is None or self._packed[0] != ptr:
            self._packed = (ptr, pack_int4(self.codes, self.scale, self.zero))
        return int4_linear(x, self.codes, self.scale, self.zero, self.bias, self._packed[1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of 32"


def quantize_model_(hf: nn.Module, quantization: str) -> None:
    """Quantize a transformers *ForCausalLM in place: every nn.Linear of the decoder blocks and the LM head.

    The embedding table stays in float (a decode step reads one row of it); a tied LM head gets its own
    int8 copy. With "int4" the block projections are `Int4Linear` and the LM head stays int8 (GGUF files keep
    the output or embedding table at 6-8 bits too; SmolLM2's is Q8_0). Raises ValueError for an unknown
    quantization, or for int4 with an input size that is not a multiple of 32."""
    if quantization in (None, "", "none"):
        return
    if quantization not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    block_linear = Int4Linear if quantization == "int4" else Int8Linear
    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, block_linear.from_linear(child))
    hf.lm_head = Int8Linear.from_linear(hf.lm_head)
    hf.config.tie_word_embeddings = False

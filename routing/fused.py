"""A decoder block's weights packed for few, large kernels: one QKV matmul and one gate+up matmul.

`pack_blocks(model)` concatenates each block's q/k/v projections into one weight (and gate/up into
another) and re-points the transformers modules' weights at views of the packed tensors, so memory is
not doubled and the model's own forward (the tests' reference) still runs on the same numbers. Works for
float weights, for `Int8Linear` (int8 rows and their scales concatenate the same way) and for `Int4Linear`
(codes, group scales and zeros concatenate along the outputs; the fused codes are packed once). The pack is
rebuilt if the model's weights were moved since (a `.to(device)` gives new tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import activations as transformers_activations

from . import cpu_ops, quant
from .quant import LINEAR_DYNAMIC, Int4Linear, Int8Linear, int4_linear, int8_linear, pack_int4, prepack_int8


@dataclass
class Proj:
    """One matmul: float `weight` [out, in]; or int8 `weight` with per-row `scale` [out] (and its fbgemm
    pack, `routing.quant.prepack_int8`); or int4 codes as `weight` [out, in] with `int4` = (scale, zero
    [out, in/32], the kernel's pack from `routing.quant.pack_int4`)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    packed: object | None = None
    int4: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4 is not None:
            return int4_linear(x, self.weight, self.int4[0], self.int4[1], self.bias, self.int4[2])
        if self.scale is not None:
            if (self.packed is not None and x.dtype == torch.float32 and x.numel() == x.shape[-1]
                    and quant.PACKED_ROWS >= 1):
                # one row (batch-1 decode): int8_linear's first case without its Python around it
                return LINEAR_DYNAMIC(x.view(1, -1), self.packed, True).view(*x.shape[:-1], -1)
            return int8_linear(x, self.weight, self.scale, self.bias, self.packed)
        m = x.numel() // x.shape[-1]
        w = self.weight
        if (1 < m <= 64 and w.shape[0] >= w.shape[1] and w.is_contiguous() and x.device.type == "cpu"
                and x.dtype == torch.float32):
            # MKL on AVX2 (measured on AMD EPYC, 1 thread): for 2-16 rows and a weight at least as tall as
            # it is wide, W @ x^T is ~1.7x faster than x @ W^T (what F.linear calls)
            out = torch.mm(w, x.reshape(m, -1).t()).t().contiguous()
            if self.bias is not None:
                out += self.bias
            return out.view(*x.shape[:-1], out.shape[-1])
        return F.linear(x, w, self.bias)


LAYOUTS = ("out_in", "in_out")


def fuse(mods: Sequence[nn.Module], layout: str = "out_in") -> Proj:
    """Concatenate the output rows of nn.Linear / Int8Linear / Int4Linear modules into one Proj (their
    weights, int8 scales, or int4 codes, scales and zeros, and biases); each module's tensors become views of
    the packed ones.

    layout (float weights only): "out_in" stores W [out, in] contiguous (transformers' layout); "in_out"
    stores W^T [in, out] contiguous and exposes W as its transposed view: F.linear then runs x @ W^T on a
    contiguous matrix, which MKL on AVX2 does ~1.7x faster for one row (batch-1 decode), ~1.4x slower for
    2-16 rows (measured, routing.fused.Proj notes). Only for weights at least as tall as wide: a wide one
    (out < in, the MLP's down projection) keeps [out, in], where one row is faster (measured on AMD EPYC,
    1 thread, 30 distinct weights: 576 x 1536 in 256 us against 309 us; 576 x 576 in 148 against 117 us
    and the 49152 x 576 LM head in 11.1 against 5.2 ms favour [in, out])."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    kinds = {type(m) if isinstance(m, (Int8Linear, Int4Linear)) else nn.Linear for m in mods}
    if len(kinds) > 1:
        raise ValueError("cannot fuse projections of different quantizations")
    int4, int8 = isinstance(mods[0], Int4Linear), isinstance(mods[0], Int8Linear)
    names = ("codes", "scale", "zero") if int4 else ("weight", "scale") if int8 else ("weight",)
    parts = {name: _cat([getattr(m, name).detach() for m in mods]) for name in names}
    main = parts[names[0]]  # weight or codes [out, in]
    tall = main.shape[0] >= main.shape[1]
    parts[names[0]] = main.t().contiguous().t() if layout == "in_out" and tall and not (int4 or int8) \
        else main.contiguous()
    biases = [m.bias for m in mods if m.bias is not None]
    bias = _cat([m.bias.detach() if m.bias is not None else biases[0].new_zeros(m.out_features)
                 for m in mods]) if biases else None
    row = 0
    for m in mods:
        n = m.out_features
        for name, t in parts.items():
            _repoint(m, name, t[row: row + n])
        if bias is not None and m.bias is not None:
            _repoint(m, "bias", bias[row: row + n])
        row += n
    if int4:  # packed once for the fused rows: the kernel's pack interleaves rows
        codes, scale, zero = parts["codes"], parts["scale"], parts["zero"]
        return Proj(codes, bias, int4=(scale, zero, pack_int4(codes, scale, zero)))
    weight, scale = parts["weight"], parts.get("scale")
    return Proj(weight, bias, scale, prepack_int8(weight, scale, bias) if scale is not None else None)


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def storage_key(m: nn.Module) -> int:
    """The data pointer that moves when a projection's weights move (int4 modules: their codes)."""
    return (m.codes if isinstance(m, Int4Linear) else m.weight).data_ptr()


def _repoint(m: nn.Module, name: str, view: torch.Tensor) -> None:
    t = getattr(m, name)
    if isinstance(t, nn.Parameter):
        t.data = view
    else:
        setattr(m, name, view)


@dataclass
class PackedBlock:
    """What the executor runs for one decoder block."""

    in_norm: torch.Tensor  # [d]
    post_norm: torch.Tensor  # [d]
    eps: float
    qkv: Proj  # d -> (H + 2 H_kv) * D
    o: Proj  # H * D -> d
    gate_up: Proj  # d -> 2 * I
    down: Proj  # I -> d
    act: Callable[[torch.Tensor], torch.Tensor]  # the MLP's activation (F.silu for a SiLU module)
    q_norm: torch.Tensor | None  # [D] (qwen3)
    k_norm: torch.Tensor | None
    scale: float  # attention scale


def norm_eps(norm: nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    # the functional form skips nn.Module's call machinery (~5 us per block and step); transformers' own
    # SiLUActivation's forward is F.silu
    silu = (nn.SiLU, getattr(transformers_activations, "SiLUActivation", nn.SiLU))
    return F.silu if type(act) in silu else act


def pack_block(layer: nn.Module, head_dim: int, layout: str) -> PackedBlock:
    attn, mlp = layer.self_attn, layer.mlp
    qk_norm = hasattr(attn, "q_norm")
    return PackedBlock(
        in_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
        eps=norm_eps(layer.input_layernorm),
        qkv=fuse([attn.q_proj, attn.k_proj, attn.v_proj], layout), o=fuse([attn.o_proj], layout),
        gate_up=fuse([mlp.gate_proj, mlp.up_proj], layout), down=fuse([mlp.down_proj], layout), act=_activation(mlp.act_fn),
        q_norm=attn.q_norm.weight if qk_norm else None, k_norm=attn.k_norm.weight if qk_norm else None,
        scale=float(getattr(attn, "scaling", head_dim**-0.5)),
    )


@dataclass
class PackedModel:
    blocks: list[PackedBlock]
    head: Proj  # the LM head (tied to the embedding when the model ties them: both see the same tensor)
    layout: str


def pack_model(hf: nn.Module, head_dim: int, layout: str = "out_in") -> PackedModel:
    """Packed blocks and head of a transformers *ForCausalLM, cached on it until its weights move or another
    layout is asked for (re-packing re-points the modules, so only one layout is ever held in memory)."""
    layers = hf.model.layers
    cached: PackedModel | None = getattr(hf, "_drllm_packed", None)
    if (cached is not None and cached.layout == layout
            and cached.blocks[0].qkv.weight.data_ptr() == storage_key(layers[0].self_attn.q_proj)
            and cached.head.weight.data_ptr() == storage_key(hf.lm_head)):
        return cached
    packed = PackedModel([pack_block(layer, head_dim, layout) for layer in layers], fuse([hf.lm_head], layout),
                         layout)
    hf._drllm_packed = packed
    return packed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama/Qwen RMSNorm: normalise in float32, cast back, then scale (transformers' LlamaRMSNorm). On the
    CPU in float32, one native call where it applies (`cpu_ops.rms_norm`)."""
    if x.dtype == torch.float32:
        out = cpu_ops.rms_norm(x, weight, eps)
        return out if out is not None else F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)

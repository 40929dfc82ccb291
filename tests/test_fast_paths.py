"""The executor's fast paths against the references: row subsets, weight layouts, the KV cache's single
allocation, int8 weights, and the quantization option's errors."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tiny import ARCHS, ATOL, DEVICE, reference_logits, tiny_model

from routing import quant
from routing.executor import RoutedExecutor
from routing.fused import pack_model
from routing.model import load_model
from routing.plan import LayerPlan
from routing.quant import Int8Linear, has_fbgemm, int8_linear, prepack_int8, quantize_int8, quantize_model_


def plans_for(rng: random.Random, b: int) -> torch.Tensor:
    rows = []
    for _ in range(b):
        counts = [rng.choice((0, 1, 2)) for _ in range(6)]
        counts[0] = max(counts[0], 1)
        rows.append(counts)
    return torch.tensor(rows)


def solo_logits(model, tokens: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
    return reference_logits(model, LayerPlan(tuple(int(c) for c in plan)), tokens[None])[0]


@pytest.mark.parametrize("gather", ["always", "never", "auto"])
@pytest.mark.parametrize("arch", ARCHS)
def test_row_subsets_match_each_row_alone(arch: str, gather: str) -> None:
    """Prefill of rows with different plans and lengths, then decode steps at different positions: every
    way of running a block for some rows only (gather them: by index, or as a contiguous view; or run all
    and keep the others' state) gives each row the logits of a plain transformers forward along its own
    plan."""
    model = tiny_model(arch)
    rng = random.Random(7)
    b = 4
    plans = plans_for(rng, b)
    plans[1:3, 1] = 0  # rows 1-2 alone skip block 1: a contiguous subset (a view) executes it
    plans[0, 2], plans[1:, 2] = 0, 1  # rows 1-3 execute block 2: contiguous too
    lengths = [3, 8, 5, 1]
    seqs = torch.randint(0, 96, (b, 12))
    ex = RoutedExecutor(model, max_batch=b, gather=gather, capacity=4)
    if gather == "auto":
        sel = ex._selections(plans, model.device)
        assert sel[1][0].span is None and sel[2][0].span == slice(1, 4)
        assert ex._subset_path(sel[1][0], b, 1) == "project" and ex._subset_path(sel[2][0], b, 1) == "view"
    tokens = seqs[:, :8].clone()
    out = ex.forward(tokens, torch.zeros(b, dtype=torch.long), plans=plans, lengths=torch.tensor(lengths),
                     all_logits=True)
    for i in range(b):
        ref = solo_logits(model, seqs[i, : lengths[i]], plans[i])
        torch.testing.assert_close(out.logits[i, : lengths[i]], ref, atol=ATOL, rtol=0)
    pos = torch.tensor(lengths)
    for _ in range(3):  # every row decodes its own next token at its own position
        step = seqs[torch.arange(b), pos][:, None]
        out = ex.forward(step, pos, plans=plans)
        for i in range(b):
            ref = solo_logits(model, seqs[i, : int(pos[i]) + 1], plans[i])[-1]
            torch.testing.assert_close(out.logits[i], ref, atol=ATOL, rtol=0)
        pos = pos + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_layouts_agree_and_share_the_models_memory(arch: str) -> None:
    model = tiny_model(arch)
    tokens = torch.randint(0, 96, (2, 9))
    with torch.inference_mode():
        ref = model.hf(tokens.to(DEVICE), use_cache=False).logits
    plans = torch.ones(2, 6, dtype=torch.long)
    for layout in ("in_out", "out_in", "in_out"):
        ex = RoutedExecutor(model, max_batch=2, weight_layout=layout)
        out = ex.forward(tokens, torch.zeros(2, dtype=torch.long), plans=plans, all_logits=True)
        torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
        with torch.inference_mode():  # the model's own forward runs on the re-pointed views
            torch.testing.assert_close(model.hf(tokens.to(DEVICE), use_cache=False).logits, ref, atol=ATOL, rtol=0)
        attn = model.layers[0].self_attn
        packed = ex.blocks[0].qkv.weight
        assert attn.q_proj.weight.data_ptr() == packed.data_ptr()  # a view, not a copy
        assert attn.v_proj.weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert ex.lm_head.weight.data_ptr() == model.hf.lm_head.weight.data_ptr()
        assert packed.is_contiguous() == (layout == "out_in")
        down = ex.blocks[0].down.weight  # wide (out < in): [out, in] in either layout
        assert down.shape[0] < down.shape[1] and down.is_contiguous()
    assert pack_model(model.hf, model.spec.head_dim, "in_out") is pack_model(model.hf, model.spec.head_dim, "in_out")


def test_kv_cache_is_allocated_once_and_moves_rows_in_every_slot() -> None:
    model = tiny_model("llama")
    ex = RoutedExecutor(model, max_batch=3, capacity=16)
    plans = torch.tensor([[1, 2, 0, 1, 1, 1]] * 3)
    ex.forward(torch.randint(0, 96, (3, 5)), torch.zeros(3, dtype=torch.long), plans=plans)
    primary, repeat = ex.cache.primary[0], ex.cache.repeats[1]
    assert primary is not None and set(ex.cache.repeats) == {1}
    ptrs = (primary.data_ptr(), repeat.data_ptr())
    for t in range(5, 16):  # decode up to capacity: no reallocation
        ex.forward(torch.randint(0, 96, (3, 1)), torch.full((3,), t), plans=plans)
    assert (ex.cache.primary[0].data_ptr(), ex.cache.repeats[1].data_ptr()) == ptrs  # type: ignore[union-attr]
    before = [ex.cache.read(layer, r, slice(2, 3), 16) for layer, r in ((0, 0), (1, 1))]
    ex.cache.move_row(2, 0)
    for (layer, r), (k, v) in zip(((0, 0), (1, 1)), before, strict=True):
        k0, v0 = ex.cache.read(layer, r, slice(0, 1), 16)
        assert torch.equal(k0, k) and torch.equal(v0, v)
    ex.forward(torch.randint(0, 96, (3, 1)), torch.full((3,), 16), plans=plans)  # past capacity: grows
    assert ex.cache.capacity == 32
    k16, v16 = ex.cache.read(0, 0, slice(0, 1), 16)
    assert torch.equal(k16, before[0][0]) and torch.equal(v16, before[0][1])  # growing kept the contents


def test_kv_cache_grows_only_the_blocks_named() -> None:
    model = tiny_model("llama")
    ex = RoutedExecutor(model, max_batch=2, capacity=8)
    ex.forward(torch.randint(0, 96, (2, 4)), torch.zeros(2, dtype=torch.long), plans=torch.ones(2, 6, dtype=torch.long))
    ex.cache.reserve(40, [1, 2])
    assert [t.shape[2] for t in ex.cache.primary] == [8, 40, 40, 8, 8, 8]  # type: ignore[union-attr]
    assert ex.cache.capacity == 8
    ex.cache.reserve(12)
    assert [t.shape[2] for t in ex.cache.primary] == [16, 40, 40, 16, 16, 16]  # type: ignore[union-attr]


def test_int8_weights_round_trip_within_half_a_step() -> None:
    w = torch.randn(40, 24) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different scales
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (40,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.skipif(DEVICE.type != "cpu" or not has_fbgemm(), reason="fbgemm is CPU-only (x86)")
def test_int8_fbgemm_rows_match_the_dequantized_weights_and_do_not_see_each_other() -> None:
    """Decode-sized int8 matmuls (fbgemm's dynamic linear, activations quantized per row to 7 bits) agree
    with the dequantized float product to within the activation quantization, and a row's result does not
    depend on the other rows of its call."""
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    packed = prepack_int8(q.weight, q.scale, q.bias)
    x = torch.randn(quant.PACKED_ROWS, 64)
    x[0] *= 100  # an outlier row: per-tensor quantization over the call would crush the others
    ref = F.linear(x, q.weight.float() * q.scale[:, None], lin.bias)
    got = int8_linear(x, q.weight, q.scale, q.bias, packed)
    for i in range(x.shape[0]):
        row = ref[i].abs().max().item()
        torch.testing.assert_close(got[i], ref[i], atol=2e-2 * row, rtol=0)
        assert torch.equal(int8_linear(x[i: i + 1], q.weight, q.scale, q.bias, packed)[0], got[i])
    torch.testing.assert_close(q(x), got, atol=0, rtol=0)  # the module packs lazily, same numbers


@pytest.mark.skipif(DEVICE.type != "cpu" or not has_fbgemm(), reason="fbgemm is CPU-only (x86)")
def test_fused_int8_projection_one_row_shortcut_equals_int8_linear() -> None:
    """`Proj`'s one-row shortcut (batch-1 decode: the fbgemm op without int8_linear around it) gives exactly
    int8_linear's numbers, for every shape a block feeds it ([1, 1, d] and [1, d])."""
    from routing.fused import fuse

    a, b = torch.nn.Linear(64, 48), torch.nn.Linear(64, 16)
    qa, qb = Int8Linear.from_linear(a), Int8Linear.from_linear(b)
    ref_w, ref_s = torch.cat([qa.weight, qb.weight]), torch.cat([qa.scale, qb.scale])
    ref_bias = torch.cat([a.bias.detach(), b.bias.detach()])
    proj = fuse([qa, qb])
    for x in (torch.randn(1, 1, 64), torch.randn(1, 64)):
        want = int8_linear(x, ref_w, ref_s, ref_bias, prepack_int8(ref_w, ref_s, ref_bias))
        got = proj(x)
        assert got.shape == want.shape and torch.equal(got, want)
    two = torch.randn(2, 1, 64)  # more rows take int8_linear itself
    assert torch.equal(proj(two), int8_linear(two, ref_w, ref_s, ref_bias, proj.packed))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the int8 kernel is CPU-only")
def test_int8_linear_matches_its_dequantized_weights() -> None:
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(quant.PACKED_ROWS + 1, 64)  # past the fbgemm rows: the bfloat16 weight-only kernel
    ref = F.linear(x, q.weight.float() * q.scale[:, None], lin.bias)
    # activations pass through bfloat16 for the kernel: relative error ~2^-8 per product
    torch.testing.assert_close(q(x), ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(int8_linear(x.bfloat16(), q.weight, q.scale, q.bias).float(), ref,
                               atol=3e-2 * ref.abs().max().item(), rtol=0)
    many = torch.randn(40, 64)  # prefill-sized: the dequantized float path
    ref = F.linear(many, q.weight.float() * q.scale[:, None], lin.bias)
    torch.testing.assert_close(q(many), ref, atol=1e-5, rtol=1e-5)


def _prefill_then_decode(model) -> tuple[torch.Tensor, torch.Tensor]:
    """A 6-token prefill and 4 cached decode steps along a plan with skips and repeats: the executor's
    logits [5, vocab] and the model's own forward's for the same positions."""
    plan = LayerPlan((1, 2, 0, 1, 1, 2))
    seq = torch.randint(0, 96, (1, 10))
    ex = RoutedExecutor(model)
    plans = torch.tensor([plan.counts])
    got = [ex.forward(seq[:, :6], torch.zeros(1, dtype=torch.long), plans=plans).logits[0]]
    for t in range(6, 10):
        got.append(ex.forward(seq[:, t: t + 1], torch.tensor([t]), plans=plans).logits[0])
    return torch.stack(got), reference_logits(model, plan, seq)[0, 5:]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the int8 kernel is CPU-only")
@pytest.mark.parametrize("packed_rows", [0, quant.PACKED_ROWS], ids=["weight-only", "fbgemm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_int8_model_executor_matches_its_transformers_forward(arch: str, packed_rows: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized in place, the transformers model and the executor (fused int8 QKV and gate+up) run the
    same int8 weights; prefill and cached decode agree with the model's own forward: tightly on the
    weight-only kernel, to within the activations' quantization (~1 % of the logits' range here) where
    decode steps run through fbgemm and the reference (10 rows per matmul) does not."""
    if packed_rows and not has_fbgemm():
        pytest.skip("no fbgemm")
    monkeypatch.setattr(quant, "PACKED_ROWS", packed_rows)
    model = tiny_model(arch)
    quantize_model_(model.hf, "int8")
    assert isinstance(model.hf.lm_head, Int8Linear)
    got, ref = _prefill_then_decode(model)
    atol = max(2e-3, ATOL) if not packed_rows else 4e-2 * ref.abs().max().item()
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)


def test_quantization_option_errors() -> None:
    with pytest.raises(ValueError, match="int3"):
        load_model("default", device="cpu", quantization="int3")
    with pytest.raises(ValueError, match="CPU"):
        load_model("default", device="cuda", quantization="int4")
    with pytest.raises(ValueError, match="CPU"):
        load_model("default", device="cuda", quantization="int8")


def test_bfloat16_executor_matches_transformers_in_bfloat16() -> None:
    model = tiny_model("qwen3")
    model.hf.to(torch.bfloat16)
    tokens = torch.randint(0, 96, (2, 7))
    with torch.inference_mode():
        ref = model.hf(tokens.to(DEVICE), use_cache=False).logits.float()
    out = RoutedExecutor(model, max_batch=2).forward(tokens, torch.zeros(2, dtype=torch.long),
                                                     plans=torch.ones(2, 6, dtype=torch.long), all_logits=True)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), ref, atol=6e-2, rtol=0)


def test_router_layer_logits_equal_the_router_modules_and_follow_weight_updates() -> None:
    from routing.router_net import RouterConfig, Routers, window_pool

    torch.manual_seed(0)
    r = Routers(RouterConfig(n_layers=3, hidden_size=32, bottleneck=16)).eval()
    for mode in (torch.enable_grad, torch.inference_mode):  # transposed views, then contiguous copies
        for b, lengths in ((1, [13]), (3, [13, 5, 1])):
            h = torch.randn(b, 13, 32)
            lens = torch.tensor(lengths)
            for layer in range(3):
                pooled, valid = window_pool(h, lens, 8)
                with torch.no_grad():
                    ref = r.layers[layer](pooled, valid)
                with mode():
                    torch.testing.assert_close(r.layer_logits(layer, h, lens), ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # an optimizer step updates weights in place: the next prefill's copies follow
        r.layers[1].fc1.weight.mul_(2)
        r.layers[1].fc2.weight.add_(1)
        pooled, valid = window_pool(h, lens, 8)
        ref = r.layers[1](pooled, valid)
        torch.testing.assert_close(r.layer_logits(1, h, lens.clone()), ref, atol=1e-5, rtol=0)
        r.layers[2].fc1.bias.add_(1)  # biases are read in place
        r.layers[0].fc1.weight.mul_(3)  # a prefill starting at layer 0 with the same lengths tensor
        for layer in (0, 2):
            pooled, valid = window_pool(h, lens, 8)
            torch.testing.assert_close(r.layer_logits(layer, h, lens), r.layers[layer](pooled, valid),
                                       atol=1e-5, rtol=0)
    x = torch.randn(1, 13, 32, requires_grad=True)  # with autograd on, gradients reach the router weights
    r.layer_logits(0, x, torch.tensor([13])).sum().backward()
    assert r.layers[0].fc1.weight.grad is not None and x.grad is not None


def test_copy_rows_copies_every_slot() -> None:
    model = tiny_model("qwen2")
    ex = RoutedExecutor(model, max_batch=4)
    plans = torch.tensor([[1, 2, 0, 1, 1, 1]] * 2)
    ex.forward(torch.randint(0, 96, (2, 5)), torch.zeros(2, dtype=torch.long), plans=plans)
    ex.cache.copy_rows(torch.tensor([0, 1]), torch.tensor([3, 2]))
    for layer, r in ((0, 0), (1, 1), (5, 0)):
        for s, d in ((0, 3), (1, 2)):
            for a, b in zip(ex.cache.read(layer, r, slice(s, s + 1), 5), ex.cache.read(layer, r, slice(d, d + 1), 5),
                            strict=True):
                assert torch.equal(a, b)


def test_int4_weights_round_trip_within_half_a_step_and_keep_q4_1_weights_exactly() -> None:
    from routing.quant import dequantize_int4, quantize_int4

    torch.manual_seed(0)
    w = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]
    codes, scale, zero = quantize_int4(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == zero.shape == (40, 2)
    step = scale.repeat_interleave(32, 1)
    assert ((dequantize_int4(codes, scale, zero) - w).abs() <= step / 2 + 1e-6 * w.abs().max()).all()
    # weights that are Q4_1 values already (d * q + m per block of 32, q spanning 0..15) come back exactly
    q = torch.randint(0, 16, (40, 64))
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15
    d, m = torch.rand(40, 2) + 0.01, torch.randn(40, 2)
    w = (q.view(40, 2, 32) * d[..., None] + m[..., None]).view(40, 64)
    codes, scale, zero = quantize_int4(w)
    assert torch.equal(codes.long(), q)
    torch.testing.assert_close(dequantize_int4(codes, scale, zero), w, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(8, 40))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the int4 kernel is CPU-only")
def test_int4_linear_matches_its_dequantized_weights() -> None:
    """Torch's int4 kernel (bfloat16 activations and group scales), for decode and prefill-sized inputs, to
    bfloat16 accuracy and each row on its own; without the kernel (its pack is None), the dequantized float32
    weights to float32 accuracy."""
    from routing.quant import Int4Linear, int4_linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int4Linear.from_linear(lin)
    ref_w = q.weight
    for shape in ((1, 64), (3, 64), (2, 20, 64), (1, 130, 64)):
        x = torch.randn(shape)
        got = q(x)
        ref = F.linear(x, ref_w, q.bias)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)
        first = x.reshape(-1, 64)[:1]
        assert torch.equal(q(first)[0], got.reshape(-1, 48)[0])
        torch.testing.assert_close(int4_linear(x, q.codes, q.scale, q.zero, q.bias, None), ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the int4 kernel is CPU-only")
@pytest.mark.parametrize("arch", ARCHS)
def test_int4_model_executor_matches_its_transformers_forward(arch: str) -> None:
    """Quantized in place, the transformers model and the executor (fused int4 QKV and gate+up, packed
    once for the fused rows) run the same int4 weights; prefill and cached decode agree with the model's own
    forward to within bfloat16 activations."""
    from routing.quant import Int4Linear

    model = tiny_model(arch)
    quantize_model_(model.hf, "int4")
    assert isinstance(model.hf.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(model.hf.lm_head, Int8Linear)
    got, ref = _prefill_then_decode(model)
    torch.testing.assert_close(got, ref, atol=4e-2 * ref.abs().max().item(), rtol=0)
    # the fused projection is the modules' own: their codes are views of its packed rows
    hd = model.spec.head_dim
    packed = pack_model(model.hf, hd)
    assert packed.blocks[0].qkv.weight.data_ptr() == model.hf.model.layers[0].self_attn.q_proj.codes.data_ptr()
    assert pack_model(model.hf, hd) is packed  # cached while the codes stay put


@pytest.mark.slow
def test_int4_holds_the_default_models_q4_1_block_weights_exactly(default_model) -> None:
    """The default model comes from a Q4_1 GGUF (blocks of 32 along the inputs): its block weights are
    already int4 values, so quantizing them again loses nothing."""
    from routing.quant import dequantize_int4, quantize_int4

    layer = default_model.hf.model.layers[7]
    for lin in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
        w = lin.weight.detach().float()
        back = dequantize_int4(*quantize_int4(w))
        assert (back - w).abs().max().item() <= 1e-5 * w.abs().max().item()

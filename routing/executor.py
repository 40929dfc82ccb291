"""The routed executor: runs prefill and decode along per-row layer plans with a slot-indexed KV cache.

Each row of a batch has its own plan, its own start position and its own length. Block l runs for the
rows whose count is >= 1, and again (into its second cache slot) for the rows whose count is 2.
Routers plug in through a `decide(layer, hidden, lengths) -> counts` callback used during prefill;
the executor never imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_ops, native
from .fused import norm_eps, pack_model, rms_norm
from .kv_cache import SlotKVCache
from .model import BaseModel

# decide(layer, hidden [b, n, d], lengths [b]) -> counts [b] (a CPU long tensor, or a list of ints: a
# router's decisions are made on the host) for that layer. The callback may also overwrite rows of `hidden`
# in place: the search injects memoized prefix states that way.
Decide = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | list[int]"]


def decided_counts(got: torch.Tensor | list[int]) -> list[int]:
    """A `Decide` callback's answer as a list of counts."""
    return got if isinstance(got, list) else got.cpu().long().tolist()


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [b, vocab] (last valid token) or [b, n, vocab]; empty with `stop`
    counts: torch.Tensor  # [b, L] CPU long: the plan each row ran
    entering: list[torch.Tensor] | None = None  # with capture: hidden state entering each block, [b, n, d]
    hidden: torch.Tensor | None = None  # with `stop`: the hidden state leaving block stop-1, [b, n, d]


def pad_right(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (tokens [b, n] right-padded, lengths [b]) for `forward`."""
    n = max(len(r) for r in rows)
    tokens = torch.tensor([list(r) + [pad] * (n - len(r)) for r in rows], dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              impl: str, causal: bool = False) -> torch.Tensor:
    # q: [b, H, n, D]; k, v: [b, H_kv, S, D]; mask: [b, 1, n, S] bool (True = attend), or None with
    # `causal` (every row starts at 0) or without (one query per row, all S keys visible)
    if impl == "sdpa":
        b, H, n, D = q.shape
        K = k.shape[1]
        if n == 1 and not causal and q.is_cpu:  # one native call on the CPU in float32 (routing.cpu_ops)
            o = cpu_ops.decode_attention(q, k, v, mask, scale)
            if o is not None:
                return o
        if n == 1 and H != K and not causal:
            # one query per row (decode): the H/K query heads sharing a KV head attend as H/K query rows of
            # it, so SDPA never repeats K and V per query head (its GQA path does: 2x slower on CPU at
            # 6,000 keys with a mask); q head h uses KV head h // (H/K), as with enable_gqa
            o = F.scaled_dot_product_attention(q.reshape(b, K, H // K, D), k, v, attn_mask=mask, scale=scale)
            return o.reshape(b, H, 1, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                              enable_gqa=H != K)
    assert mask is not None
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


@dataclass
class _Selection:
    """Which rows run one (layer, repeat): all, none, or a subset as a mask [b, 1, 1] and indices [k]
    (`span` too when those rows are contiguous: then a gather is a view)."""

    count: int
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None
    span: slice | None = None


def _selection(col: list[int], repeat: int, device: torch.device) -> _Selection:
    sel = [c > repeat for c in col]
    k = sum(sel)
    if k in (0, len(sel)):
        return _Selection(k)
    on = [i for i, s in enumerate(sel) if s]
    span = slice(on[0], on[-1] + 1) if on[-1] - on[0] + 1 == k else None
    return _Selection(k, torch.tensor(sel, device=device)[:, None, None], torch.tensor(on, device=device), span)


GATHER_RULES = ("auto", "always", "never")


def _index_rows(rows: torch.Tensor | slice, idx: torch.Tensor) -> torch.Tensor:
    """Cache rows of the batch rows idx [k], where the batch's rows are `rows` (a slice or [b])."""
    if isinstance(rows, slice):
        return idx + rows.start
    return rows[idx]


class RoutedExecutor:
    """Runs prefill and decode along per-row plans (see the module docstring).

    Host work per forward does not grow with L: the per-(layer, repeat) row selections are built once per
    distinct set of plans (decode steps reuse them), the attention mask and rotary tables once per
    forward, and a block is a fixed sequence of ~17 kernels (fused QKV and gate+up matmuls, see
    routing.fused). Rows that skip a block either ride along and keep their hidden state (few tokens:
    memory-bound, a gather costs as much as the block) or, from `subset_min_tokens` tokens in the forward
    on (prefill, large batches: compute-bound), are gathered so that the block runs only for the rows
    that execute it. In decode steps of mixed plans (`gather="auto"`) a block runs only for its rows whenever
    its rows without copying any keys or values: contiguous rows as views, others by running the projections
    and the MLP for them alone and attention for every row on cache views (cheap at one query per row). On CPU
    a decode step at batch 8 is mostly compute (measured, default model, 1 thread: 43 ms for 2 rows, 86 ms
    for 8), so a row that skips a block should not pay for it.

    gather: "auto" (the rule above), "always" (every subset is gathered by index) or "never" (every subset
    rides along: the old decode path); the last two exist for tests and benchmarks."""

    def __init__(self, model: BaseModel, max_batch: int = 1, attn_impl: str = "sdpa", capacity: int = 128,
                 subset_min_tokens: int = 64, weight_layout: str = "auto", gather: str = "auto"):
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError("attn_impl must be 'sdpa' or 'eager'")
        if gather not in GATHER_RULES:
            raise ValueError(f"gather must be one of {GATHER_RULES}")
        self.model, self.spec, self.attn_impl = model, model.spec, attn_impl
        self.max_batch = max_batch
        self.subset_min_tokens = subset_min_tokens
        self.gather = gather
        if weight_layout == "auto":  # see routing.fused.fuse: one row per matmul favours [in, out] on CPU
            cpu32 = model.device.type == "cpu" and model.dtype == torch.float32
            weight_layout = "in_out" if cpu32 and max_batch == 1 else "out_in"
        packed = pack_model(model.hf, self.spec.head_dim, weight_layout)
        self.blocks, self.lm_head = packed.blocks, packed.head
        if model.device.type == "cpu" and model.dtype == torch.float32:
            native.load()  # build the native CPU kernels (routing.cpu_ops) now, not inside the first forward
        norm = model.hf.model.norm
        self.final_norm, self.final_eps = norm.weight, norm_eps(norm)
        self.cache = SlotKVCache(self.spec.n_layers, self.spec.n_kv_heads, self.spec.head_dim, max_batch,
                                 model.dtype, model.device, capacity)
        self._plans_key: bytes | None = None
        self._plans_sel: list[tuple[_Selection, _Selection]] = []

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    def _block(self, layer: int, repeat: int, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               pos: torch.Tensor | slice, rows: torch.Tensor | slice, key_len: int, mask: torch.Tensor | None,
               causal: bool, only: torch.Tensor | None = None) -> torch.Tensor:
        # h: [b, n, d]; rope: (cos, signed sin) [b, n, 1, D]; pos: [b, n] cache positions, or one slice
        # shared by all rows. only: [k] row indices; the block runs for those rows (the others' h is
        # returned unchanged): their projections and MLP alone, attention for all b rows on cache views (a
        # read, no copy; the other rows' attention outputs are dropped)
        blk = self.blocks[layer]
        full_h = h
        if only is not None:
            h, rope = h[only], (rope[0][only], rope[1][only])
        b, n, _ = h.shape
        H, K, D = self.spec.n_heads, self.spec.n_kv_heads, self.spec.head_dim
        qkv = blk.qkv(rms_norm(h, blk.in_norm, blk.eps)).view(b, n, H + 2 * K, D)
        if blk.q_norm is not None:
            qkv[:, :, :H] = rms_norm(qkv[:, :, :H], blk.q_norm, blk.eps)
            qkv[:, :, H: H + K] = rms_norm(qkv[:, :, H: H + K], blk.k_norm, blk.eps)
        # rotary embedding in place on q and k: x*cos + rotate_half(x)*sin, where rotate_half(x)*sin ==
        # roll(x, D/2)*signed_sin (transformers' apply_rotary_pos_emb, the same products)
        qk = qkv[:, :, : H + K]
        rolled = qk.roll(D // 2, -1)
        qk.mul_(rope[0]).addcmul_(rolled, rope[1])
        q = qkv[:, :, :H]
        if only is None:
            self.cache.write(layer, repeat, rows, pos, qkv[:, :, H:])
        else:
            self.cache.write(layer, repeat, _index_rows(rows, only), pos if isinstance(pos, slice) else pos[only], qkv[:, :, H:])
            q = q.new_zeros(full_h.shape[0], n, H, D).index_copy_(0, only, q)
        keys, values = self.cache.read(layer, repeat, rows, key_len)
        o = attention(q.transpose(1, 2), keys, values, mask, blk.scale, self.attn_impl, causal).transpose(1, 2)
        if only is not None:
            o = o[only]
        h = h + blk.o(o.reshape(b, n, H * D))
        gate, up = blk.gate_up(rms_norm(h, blk.post_norm, blk.eps)).chunk(2, -1)
        h = h + blk.down(blk.act(gate).mul_(up))  # the activation returns a new tensor
        return h if only is None else full_h.index_copy(0, only, h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: h [..., d] -> logits [..., V] (the model's own head, through Proj)."""
        return self.lm_head(rms_norm(h, self.final_norm, self.final_eps))

    def _selections(self, counts: torch.Tensor, device: torch.device) -> list[tuple[_Selection, _Selection]]:
        # counts [b, L] CPU long -> per layer (first execution, repeat); cached while the plans repeat
        key = counts.numpy().tobytes() + repr((tuple(counts.shape), str(device))).encode()
        if key != self._plans_key:
            self._plans_sel = [(_selection(c, 0, device), _selection(c, 1, device)) for c in counts.t().tolist()]
            self._plans_key = key
        return self._plans_sel

    def _subset_path(self, sel: _Selection, b: int, n: int) -> str:
        """How a block runs for a subset of the rows: "gather" (index the rows out: h, rope, mask and their
        keys/values, a copy), "view" (contiguous rows: slices, no copy), "project" (projections and MLP for
        the subset only, attention for every row on cache views) or "ride" (every row runs the block, the
        others keep their h)."""
        if self.gather == "never":
            return "ride"
        if self.gather == "always" or b * n >= self.subset_min_tokens:  # compute-bound: prefill
            return "gather"
        return "view" if sel.span is not None else "project"

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start: torch.Tensor,
        plans: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        decide: Decide | None = None,
        all_logits: bool = False,
        capture: bool = False,
        resume: tuple[int, torch.Tensor] | None = None,
        stop: int | None = None,
    ) -> ForwardOutput:
        """Run `tokens` [b, n] (right-padded; `lengths` [b] valid tokens per row, default n) at positions
        start[b] + 0..n-1, into cache rows `rows` [b] (default 0..b-1), along `plans` [b, L] or, when
        `decide` is given, along the counts it returns layer by layer.

        capture: also return the hidden state entering every block. resume=(layer, hidden): start at
        `layer` from `hidden` [b, n, d]; the cache slots of the earlier layers must already hold these
        rows' keys and values (a previous forward of the same tokens whose plan agrees before `layer`).
        stop: run blocks only up to stop-1 and return their output as `hidden` (no logits); with resume, this
        runs a range of layers for a chunk of tokens (layer-major chunked prefill)."""
        dev = self.model.device
        b, n = tokens.shape
        L = self.n_layers
        start_cpu = start.cpu().long()
        start = start.to(dev, torch.long)
        lengths_cpu = torch.full((b,), n, dtype=torch.long) if lengths is None else lengths.cpu().long()
        if plans is None and decide is None:
            raise ValueError("forward needs plans or a decide callback")
        counts = torch.ones(b, L, dtype=torch.long) if plans is None else plans.cpu().long().clone()
        if counts.shape != (b, L):
            raise ValueError(f"plans must have shape ({b}, {L}), got {tuple(counts.shape)}")
        if rows is None or (rows.numel() == b and torch.equal(rows.cpu(), torch.arange(b))):
            row_ref: torch.Tensor | slice = slice(0, b)
        else:
            row_ref = rows.to(dev, torch.long)
        pos = start[:, None] + torch.arange(n, device=dev)  # [b, n]
        key_len = int((start_cpu + n).max())
        first = 0 if resume is None else resume[0]
        self.cache.reserve(key_len, range(first, L if stop is None else stop))
        # rows at one common position need no explicit mask: a causal prefill from 0, or one new token each
        same_start = bool((start_cpu == start_cpu[0]).all())
        span = slice(int(start_cpu[0]), int(start_cpu[0]) + n) if same_start else None
        causal = same_start and int(start_cpu[0]) == 0 and n > 1
        mask: torch.Tensor | None = None
        if self.attn_impl == "eager" or not (same_start and (causal or n == 1)):
            mask = (torch.arange(key_len, device=dev)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
            causal = False
        if resume is None:
            h = self.model.embed(tokens.to(dev))
        else:
            h = resume[1]
        cos, sin = self.model.rotary(h, pos)  # [b, n, D]
        half = cos.shape[-1] // 2
        rope = (cos.unsqueeze(2), torch.cat((-sin[..., :half], sin[..., half:]), -1).unsqueeze(2))
        entering: list[torch.Tensor] | None = [] if capture else None
        selections = None if decide is not None else self._selections(counts, dev)
        decided: list[list[int]] = []  # with decide: each layer's counts, written into `counts` at the end

        for layer in range(first, L if stop is None else stop):
            if entering is not None:
                entering.append(h)
            if selections is None:
                assert decide is not None
                col = decided_counts(decide(layer, h, lengths_cpu))
                decided.append(col)
                pair = (_selection(col, 0, dev), _selection(col, 1, dev))
            else:
                pair = selections[layer]
            for repeat, sel in enumerate(pair):
                if sel.count == 0:
                    continue
                if sel.count == b:
                    h = self._block(layer, repeat, h, rope, span or pos, row_ref, key_len, mask, causal)
                    continue
                path = self._subset_path(sel, b, n)
                if path == "ride":
                    # every row runs and the skipping rows keep their h; they write a cache slot they never
                    # read
                    out = self._block(layer, repeat, h, rope, span or pos, row_ref, key_len, mask, causal)
                    h = torch.where(sel.mask, out, h)
                elif path == "project":
                    assert sel.index is not None
                    h = self._block(layer, repeat, h, rope, span or pos, row_ref, key_len, mask, causal,
                                    only=sel.index)
                elif path == "view":
                    assert sel.span is not None  # contiguous rows: views of h, rope, positions and the cache
                    r = sel.span
                    sub_rows = (slice(row_ref.start + r.start, row_ref.start + r.stop)
                                if isinstance(row_ref, slice) else row_ref[r])
                    sub_mask = None if mask is None else mask[r]
                    out = self._block(layer, repeat, h[r], (rope[0][r], rope[1][r]), span or pos[r], sub_rows,
                                      key_len, sub_mask, causal)
                    h = torch.cat((h[: r.start], out, h[r.stop:]))
                else:
                    idx = sel.index
                    assert idx is not None
                    sub_rows = idx if isinstance(row_ref, slice) else row_ref[idx]
                    sub_mask = None if mask is None else mask[idx]
                    sub_rope = (rope[0][idx], rope[1][idx])
                    out = self._block(layer, repeat, h[idx], sub_rope, span or pos[idx], sub_rows, key_len,
                                      sub_mask, causal)
                    h = h.index_copy(0, idx, out)
        if decided:
            counts[:, first: first + len(decided)] = torch.tensor(decided, dtype=torch.long).t()
        if stop is not None:
            return ForwardOutput(logits=h.new_empty(0), counts=counts, entering=entering, hidden=h)
        if all_logits:
            logits = self.head(h)
        else:
            last = (lengths_cpu - 1).to(dev)
            logits = self.head(h[torch.arange(b, device=dev), last])
        return ForwardOutput(logits=logits, counts=counts, entering=entering)

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

from .kv_cache import SlotKVCache, slot_of
from .model import BaseModel

# decide(layer, hidden [b, n, d], lengths [b]) -> counts [b] (CPU long) for that layer. The callback may
# also overwrite rows of `hidden` in place: the search injects memoized prefix states that way.
Decide = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [b, vocab] (last valid token) or [b, n, vocab]
    counts: torch.Tensor  # [b, L] CPU long: the plan each row ran
    entering: list[torch.Tensor] | None = None  # with capture: hidden state entering each block, [b, n, d]


def pad_right(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (tokens [b, n] right-padded, lengths [b]) for `forward`."""
    n = max(len(r) for r in rows)
    tokens = torch.tensor([list(r) + [pad] * (n - len(r)) for r in rows], dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              impl: str, causal: bool = False) -> torch.Tensor:
    # q: [b, H, n, D]; k, v: [b, H_kv, S, D]; mask: [b, 1, n, S] bool (True = attend), or None with
    # `causal` (every row starts at 0) or without (one query per row, all S keys visible)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])
    assert mask is not None
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class RoutedExecutor:
    def __init__(self, model: BaseModel, max_batch: int = 1, attn_impl: str = "sdpa", capacity: int = 128):
        if attn_impl not in ("sdpa", "eager"):
            raise ValueError("attn_impl must be 'sdpa' or 'eager'")
        self.model, self.spec, self.attn_impl = model, model.spec, attn_impl
        self.max_batch = max_batch
        self.cache = SlotKVCache(self.spec.n_kv_heads, self.spec.head_dim, max_batch, model.dtype,
                                 model.device, capacity)

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers

    def _block(self, layer: int, repeat: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor | slice, rows: torch.Tensor | slice, key_len: int, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        # h: [b, n, d]; cos, sin: [b, n, D]; pos: [b, n] cache positions, or one slice shared by all rows
        blk = self.model.layers[layer]
        attn = blk.self_attn
        b, n, _ = h.shape
        hd = self.spec.head_dim
        x = blk.input_layernorm(h)
        q = attn.q_proj(x).view(b, n, -1, hd)
        k = attn.k_proj(x).view(b, n, -1, hd)
        v = attn.v_proj(x).view(b, n, -1, hd).transpose(1, 2)
        if self.spec.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, H, n, D]
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        slot = slot_of(layer, repeat)
        self.cache.write(slot, rows, pos, k, v)
        keys, values = self.cache.read(slot, rows, key_len)
        scale = getattr(attn, "scaling", hd**-0.5)
        o = attention(q, keys, values, mask, scale, self.attn_impl, causal)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        return h + blk.mlp(blk.post_attention_layernorm(h))

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
    ) -> ForwardOutput:
        """Run `tokens` [b, n] (right-padded; `lengths` [b] valid tokens per row, default n) at positions
        start[b] + 0..n-1, into cache rows `rows` [b] (default 0..b-1), along `plans` [b, L] or, when
        `decide` is given, along the counts it returns layer by layer.

        capture: also return the hidden state entering every block. resume=(layer, hidden): start at
        `layer` from `hidden` [b, n, d]; the cache slots of the earlier layers must already hold these
        rows' keys and values (a previous forward of the same tokens whose plan agrees before `layer`)."""
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
        self.cache.reserve(key_len)
        # rows at one common position need no explicit mask: a causal prefill from 0, or one new token each
        same_start = bool((start_cpu == start_cpu[0]).all())
        span = slice(int(start_cpu[0]), int(start_cpu[0]) + n) if same_start else None
        causal = same_start and int(start_cpu[0]) == 0 and n > 1
        mask: torch.Tensor | None = None
        if self.attn_impl == "eager" or not (same_start and (causal or n == 1)):
            mask = (torch.arange(key_len, device=dev)[None, None, :] <= pos[:, :, None]).unsqueeze(1)
            causal = False
        first = 0
        if resume is None:
            h = self.model.embed(tokens.to(dev))
        else:
            first, h = resume
        cos, sin = self.model.rotary(h, pos)
        entering: list[torch.Tensor] | None = [] if capture else None

        for layer in range(first, L):
            if entering is not None:
                entering.append(h)
            if decide is not None:
                counts[:, layer] = decide(layer, h, lengths_cpu).cpu().long()
            col = counts[:, layer].tolist()
            for repeat in (0, 1):
                sel = [c > repeat for c in col]
                n_sel = sum(sel)
                if n_sel == 0:
                    continue
                if n_sel == b or n == 1:
                    # all rows, or a decode step (memory-bound: running the block for every row costs about
                    # the same as a gather; rows that skip write a slot they never read and keep their h)
                    out = self._block(layer, repeat, h, cos, sin, span or pos, row_ref, key_len, mask, causal)
                    if n_sel == b:
                        h = out
                    else:
                        h = torch.where(torch.tensor(sel, device=dev)[:, None, None], out, h)
                else:
                    idx = torch.tensor([i for i, on in enumerate(sel) if on], device=dev)
                    sub_rows = idx if isinstance(row_ref, slice) else row_ref[idx]
                    sub_mask = None if mask is None else mask[idx]
                    h = h.clone()
                    h[idx] = self._block(layer, repeat, h[idx], cos[idx], sin[idx], span or pos[idx], sub_rows,
                                         key_len, sub_mask, causal)
        if all_logits:
            logits = self.model.head(h)
        else:
            last = (lengths_cpu - 1).to(dev)
            logits = self.model.head(h[torch.arange(b, device=dev), last])
        return ForwardOutput(logits=logits, counts=counts, entering=entering)

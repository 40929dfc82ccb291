"""A KV cache indexed by *execution slot*: block l's first execution uses slot 2l, its repeat slot 2l+1.

A skipped block never reads its slots; a repeated block keeps two (the reference implementation shares
one slot between both executions, which gives wrong logits). Each batch row stores its own tokens at
their absolute positions 0..len-1, so rows of different lengths and plans share one tensor per slot.

Layout: keys and values of one slot live together, `[max_batch, 2 * H_kv, capacity, D]` (heads 0..H_kv-1
keys, then values), so one index write stores both, and a read is a view in the head-major layout SDPA's
fused CPU kernel wants (a token-major view makes it fall back to the unfused math path). The first-execution slots of all
L blocks are one tensor `[L, max_batch, 2 * H_kv, capacity, D]`, allocated once, on first use; repeat
slots are allocated per block on first use (most plans repeat few blocks or none). Capacity grows
geometrically when a forward needs more positions (`reserve`); a caller that knows a sequence's final
length can reserve it up front so no decode step ever reallocates.
"""

from __future__ import annotations

import torch


def slot_of(layer: int, repeat: int) -> int:
    return 2 * layer + repeat


class SlotKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_batch: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 128) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim, self.max_batch = n_layers, n_kv_heads, head_dim, max_batch
        self.dtype, self.device = dtype, device
        self.capacity = capacity
        self.primary: torch.Tensor | None = None  # [L, max_batch, 2 H_kv, capacity, D]
        self.repeats: dict[int, torch.Tensor] = {}  # layer -> [max_batch, 2 H_kv, capacity, D]

    def _empty(self, *lead: int, length: int) -> torch.Tensor:
        shape = (*lead, self.max_batch, 2 * self.n_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (grows geometrically: at least doubles)."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity)
        old = self.capacity
        if self.primary is not None:
            grown = self._empty(self.n_layers, length=new)
            grown[:, :, :, :old] = self.primary
            self.primary = grown
        for layer, t in self.repeats.items():
            grown = self._empty(length=new)
            grown[:, :, :old] = t
            self.repeats[layer] = grown
        self.capacity = new

    def slot(self, layer: int, repeat: int) -> torch.Tensor:
        """The [max_batch, 2 H_kv, capacity, D] tensor of block `layer`'s execution `repeat` (0 or 1)."""
        if repeat == 0:
            if self.primary is None:
                self.primary = self._empty(self.n_layers, length=self.capacity)
            return self.primary[layer]
        t = self.repeats.get(layer)
        if t is None:
            t = self.repeats[layer] = self._empty(length=self.capacity)
        return t

    def has_slot(self, slot: int) -> bool:
        layer, repeat = divmod(slot, 2)
        return self.primary is not None if repeat == 0 else layer in self.repeats

    def write(self, layer: int, repeat: int, rows: torch.Tensor | slice, positions: torch.Tensor | slice,
              kv: torch.Tensor) -> None:
        # rows: [b] or a slice; positions: [b, n], or one slice when every row writes the same span;
        # kv: [b, n, 2 H_kv, D]
        t = self.slot(layer, repeat)
        if isinstance(positions, slice):
            t[rows, :, positions] = kv.transpose(1, 2)
            return
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=self.device)
        t[rows[:, None], :, positions] = kv

    def read(self, layer: int, repeat: int, rows: torch.Tensor | slice,
             length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> keys, values [b, H_kv, length, D]; views when rows is a slice
        t = self.slot(layer, repeat)[rows, :, :length]
        return t[:, : self.n_kv_heads], t[:, self.n_kv_heads:]

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        """Copy row src into row dst in every slot (used to keep active rows a contiguous prefix)."""
        if src == dst:
            return
        if self.primary is not None:
            self.primary[:, dst] = self.primary[:, src]
        for t in self.repeats.values():
            t[dst] = t[src]

    @torch.inference_mode()
    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy rows src[i] into rows dst[i] (src, dst: [k] long) in every slot, one indexed copy per slot
        (the offline scorer shares one prompt prefill among several continuations this way)."""
        src, dst = src.to(self.device), dst.to(self.device)
        if self.primary is not None:
            self.primary[:, dst] = self.primary[:, src]
        for t in self.repeats.values():
            t[dst] = t[src]

    def clear(self) -> None:
        self.primary = None
        self.repeats.clear()

    def nbytes(self) -> int:
        tensors = ([] if self.primary is None else [self.primary]) + list(self.repeats.values())
        return sum(t.numel() * t.element_size() for t in tensors)

"""A KV cache indexed by *execution slot*: block l's first execution uses slot 2l, its repeat slot 2l+1.

A skipped block never touches its slots; a repeated block keeps two (the reference implementation shares
one slot between both executions, which gives wrong logits). Each batch row stores its own tokens at
their absolute positions 0..len-1, so rows of different lengths and plans share one tensor per slot.
Slots are allocated on first use and grow along the sequence axis.
"""

from __future__ import annotations

import torch


def slot_of(layer: int, repeat: int) -> int:
    return 2 * layer + repeat


class SlotKVCache:
    def __init__(self, n_kv_heads: int, head_dim: int, max_batch: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 128) -> None:
        self.n_kv_heads, self.head_dim, self.max_batch = n_kv_heads, head_dim, max_batch
        self.dtype, self.device = dtype, device
        self.capacity = capacity
        self.k: dict[int, torch.Tensor] = {}  # slot -> [max_batch, H_kv, capacity, D]
        self.v: dict[int, torch.Tensor] = {}

    def _empty(self, length: int) -> torch.Tensor:
        shape = (self.max_batch, self.n_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, length: int) -> None:
        """Make room for `length` positions in every slot (grows geometrically)."""
        if length <= self.capacity:
            return
        new = max(length, 2 * self.capacity)
        for store in (self.k, self.v):
            for s, t in store.items():
                grown = self._empty(new)
                grown[:, :, : t.shape[2]] = t
                store[s] = grown
        self.capacity = new

    def write(self, slot: int, rows: torch.Tensor | slice, positions: torch.Tensor | slice,
              k: torch.Tensor, v: torch.Tensor) -> None:
        # rows: [b] or a slice; positions: [b, n], or one slice when every row writes the same span;
        # k, v: [b, H_kv, n, D]
        if slot not in self.k:
            self.k[slot], self.v[slot] = self._empty(self.capacity), self._empty(self.capacity)
        if isinstance(positions, slice):
            self.k[slot][rows, :, positions] = k
            self.v[slot][rows, :, positions] = v
            return
        ridx = torch.arange(rows.start, rows.stop, device=self.device) if isinstance(rows, slice) else rows
        ridx = ridx[:, None]
        self.k[slot][ridx, :, positions] = k.transpose(1, 2)
        self.v[slot][ridx, :, positions] = v.transpose(1, 2)

    def read(self, slot: int, rows: torch.Tensor | slice, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> [b, H_kv, length, D]; a view when rows is a slice
        return self.k[slot][rows, :, :length], self.v[slot][rows, :, :length]

    @torch.inference_mode()
    def move_row(self, src: int, dst: int) -> None:
        """Copy row src into row dst in every slot (used to keep active rows a contiguous prefix)."""
        if src == dst:
            return
        for store in (self.k, self.v):
            for t in store.values():
                t[dst] = t[src]

    @torch.inference_mode()
    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy rows src[i] into rows dst[i] (src, dst: [k] long) in every slot, one indexed copy per slot
        (the offline scorer shares one prompt prefill among several continuations this way)."""
        src, dst = src.to(self.device), dst.to(self.device)
        for store in (self.k, self.v):
            for t in store.values():
                t[dst] = t[src]

    def clear(self) -> None:
        self.k.clear()
        self.v.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.k, self.v) for t in store.values())

"""A KV cache indexed by *execution slot*: block l's first execution uses slot 2l, its repeat slot 2l+1.

A skipped block never reads its slots; a repeated block keeps two (the reference implementation shares
one slot between both executions, which gives wrong logits). Each batch row stores its own tokens at
their absolute positions 0..len-1, so rows of different lengths and plans share one tensor per slot.

Layout: keys and values of one slot live together, `[max_batch, 2 * H_kv, capacity, D]` (heads 0..H_kv-1
keys, then values), so one index write stores both, and a read is a view in the head-major layout SDPA's
fused CPU kernel wants (a token-major view makes it fall back to the unfused math path). Every slot is its
own tensor, allocated on first use (most plans repeat few blocks or none, so most repeat slots never are),
and every block has its own capacity: `reserve(length, layers)` grows only the blocks named, so a
layer-major prefill grows block l's slots when it reaches block l (a fraction of the whole cost per engine
step) instead of stalling one step on all of them. Capacity grows geometrically (at least doubles); a
caller that knows a sequence's final length can reserve it up front so no decode step ever reallocates.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SlotKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_batch: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 128) -> None:
        self.n_layers, self.n_kv_heads, self.head_dim, self.max_batch = n_layers, n_kv_heads, head_dim, max_batch
        self.dtype, self.device = dtype, device
        self._caps = [capacity] * n_layers  # positions each block's slots hold
        self.primary: list[torch.Tensor | None] = [None] * n_layers  # layer -> [max_batch, 2 H_kv, cap, D]
        self.repeats: dict[int, torch.Tensor] = {}  # layer -> [max_batch, 2 H_kv, cap, D]

    @property
    def capacity(self) -> int:
        """Positions every slot holds (the smallest block capacity)."""
        return min(self._caps)

    def _empty(self, length: int) -> torch.Tensor:
        shape = (self.max_batch, 2 * self.n_kv_heads, length, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _tensors(self) -> list[torch.Tensor]:
        return [t for t in self.primary if t is not None] + list(self.repeats.values())

    def reserve(self, length: int, layers: Iterable[int] | None = None) -> None:
        """Make room for `length` positions in the slots of `layers` (default: every block); a block that
        grows at least doubles its capacity. The slots' contents are kept."""
        for layer in range(self.n_layers) if layers is None else layers:
            old = self._caps[layer]
            if length <= old:
                continue
            new = max(length, 2 * old)
            for t, put in ((self.primary[layer], self.primary.__setitem__),
                           (self.repeats.get(layer), self.repeats.__setitem__)):
                if t is not None:
                    grown = self._empty(new)
                    grown[:, :, :old] = t
                    put(layer, grown)
            self._caps[layer] = new

    def slot(self, layer: int, repeat: int) -> torch.Tensor:
        """The [max_batch, 2 H_kv, capacity, D] tensor of block `layer`'s execution `repeat` (0 or 1)."""
        if repeat == 0:
            t = self.primary[layer]
            if t is None:
                t = self.primary[layer] = self._empty(self._caps[layer])
            return t
        t = self.repeats.get(layer)
        if t is None:
            t = self.repeats[layer] = self._empty(self._caps[layer])
        return t

    def has_slot(self, slot: int) -> bool:
        layer, repeat = divmod(slot, 2)
        return self.primary[layer] is not None if repeat == 0 else layer in self.repeats

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
    def move_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row src into row dst in every slot (used to keep active rows a contiguous prefix); `length`:
        only the first positions (the ones src holds), default all."""
        if src == dst:
            return
        for t in self._tensors():
            t[dst, :, :length] = t[src, :, :length]

    @torch.inference_mode()
    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy rows src[i] into rows dst[i] (src, dst: [k] long) in every slot, one indexed copy per slot
        (the offline scorer shares one prompt prefill among several continuations this way)."""
        src, dst = src.to(self.device), dst.to(self.device)
        for t in self._tensors():
            t[dst] = t[src]

    def clear(self) -> None:
        self.primary = [None] * self.n_layers
        self.repeats.clear()

"""Layer-major chunked prefill: a long prompt is prefilled a bounded amount per engine step, interleaved with
the decode steps of the running rows, while routing still sees the whole prompt.

Routers need the whole prompt: router l reads the hidden state of *every* prompt token entering block l.
A token-major chunking (vLLM's: all layers for tokens 0..c, then for c..2c) would have to decide the plan
before the prompt's end is seen. So the prompt is run **layer by layer**: block l runs over the whole
prompt in token chunks of `chunk_tokens` (each chunk at its offset, attending to the keys of the chunks
before it, which is exactly causal attention), and only then is router l+1 asked, with the complete hidden
state. The result (logits, KV cache, plan) equals an unchunked prefill.

Pacing. Each engine step (a *slice*) spends at most `budget` cost units and at most `time_budget()`
seconds on the prompt (the generator asks for about one recent decode step while rows are running), so a
6,000-token prompt costs every running stream a bounded delay per step instead of one long stall. A
chunk's cost is estimated, not assumed constant: one unit is one token through one block's matmuls, and
attention adds `keys / keys_per_unit` per token (keys_per_unit = the keys whose attention costs as much as
a token's matmuls, from the model's shapes), so a chunk near the end of a long prompt counts for more
than one at its start. A slice pauses before its next chunk once its units or its time are used up, so
it overruns its time by at most one chunk (timed with a device synchronisation on CUDA). The
steps that are not chunks are kept small too: block l's KV slots grow when the prefill reaches block l
(`SlotKVCache.reserve(length, layers)`: 1/L of the growth per step, not all of it at once, and to the
sequence's final length, so its first decode step does not grow them again), the prompt's logits for
prompt logprobs are computed in chunks, and the prefill pauses once more before it returns, so the step
that admits the row (moving its cache row, sampling its first token) carries no chunk work.

How the planner meets this without knowing it: `LayerMajorExecutor` stands in for the `RoutedExecutor`
the planner drives. Its `forward` runs the planner's `decide` callback (or fixed plan) layer by layer as
above and calls `pause()` whenever the step's budget is spent. The planner's `prefill` call runs in a
`SteppedCall`, a helper thread that runs only while the engine thread waits for it (a coroutine: never two
threads in torch at once), so the planner code (routers, budget re-runs) stays the one implementation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .executor import Decide, ForwardOutput, RoutedExecutor, decided_counts


class Cancelled(Exception):
    """Raised inside a `SteppedCall` whose owner gave up on it (the sequence was aborted)."""


class SteppedCall:
    """Runs `fn(pause)` on a helper thread, one slice at a time: `advance()` (engine thread) lets it run until
    it calls `pause()` or returns, and waits meanwhile. Exactly one of the two threads runs at any time."""

    def __init__(self, fn: Callable[[Callable[[], None]], Any]) -> None:
        self._fn = fn
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._cancelled = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="drllm-prefill", daemon=True)
        self._started = False

    def _main(self) -> None:
        self._go.acquire()
        try:
            if self._cancelled:
                raise Cancelled
            self.result = self._fn(self._pause)
        except BaseException as e:  # noqa: BLE001 - handed to the owner
            self.error = e
        self.done = True
        self._back.release()

    def _pause(self) -> None:
        self._back.release()
        self._go.acquire()
        if self._cancelled:
            raise Cancelled

    def advance(self) -> bool:
        """Run the next slice; True when the call has finished (see `result` / `error`)."""
        if self.done:
            return True
        if not self._started:
            self._started = True
            self._thread.start()
        self._go.release()
        self._back.acquire()
        return self.done

    def cancel(self) -> None:
        """Unwind the helper thread (its next `pause` raises Cancelled) and wait for it."""
        if self.done:
            return
        self._cancelled = True
        if not self._started:
            self.done = True
            return
        while not self.advance():
            pass


class LayerMajorExecutor:
    """A `RoutedExecutor` stand-in for one long prefill: same `forward` contract, run layer by layer in token
    chunks with a `pause()` after every `budget` token-block units. Rows must share a start (a prefill)."""

    def __init__(self, inner: RoutedExecutor, pause: Callable[[], None], chunk_tokens: int, budget: float,
                 time_budget: Callable[[], float | None] = lambda: None, reserve: int = 0) -> None:
        """budget: cost units per slice (see `cost`); time_budget() -> seconds per slice (None: no limit),
        read before each chunk, e.g. the running rows' decode step so their inter-token gap stays bounded;
        reserve: KV positions to make room for in each block's slots (the sequence's final length; at least
        the prompt's)."""
        self.inner = inner
        self.model = inner.model
        self.cache = inner.cache
        self._pause = pause
        self.chunk_tokens = max(1, chunk_tokens)
        self.budget = max(1.0, budget)
        self._time_budget = time_budget
        self.reserve = reserve
        spec = inner.spec
        ffn = getattr(getattr(inner.model.hf, "config", None), "intermediate_size", None) or 4 * spec.hidden_size
        d, hd = spec.hidden_size, spec.n_heads * spec.head_dim
        per_token = d * (spec.n_heads + 2 * spec.n_kv_heads) * spec.head_dim + hd * d + 3 * d * ffn  # MACs
        self.keys_per_unit = per_token / (2 * hd)  # QK^T and PV: 2 * H * D MACs per attended key
        self.head_units = spec.vocab_size * d / per_token  # the LM head over one token, in units
        self._spent = 0.0
        self._t0 = time.perf_counter()

    def cost(self, rows: int, tokens: int, keys: float) -> float:
        """Estimated cost of one block execution over `tokens` new tokens of `rows` rows that attend to
        `keys` keys on average, in units (one unit: one token through one block's matmuls)."""
        return rows * tokens * (1.0 + keys / self.keys_per_unit)

    @property
    def n_layers(self) -> int:
        return self.inner.n_layers

    def _spend(self, units: float) -> None:
        """Before work of `units`: pause first when this slice has used its unit budget, or its time budget
        has already run out; a slice always gets at least one piece of work."""
        if self._spent:
            limit = self._time_budget()
            late = limit is not None and time.perf_counter() - self._t0 > limit
            if late or self._spent + units > self.budget:
                self._pause()
                self._spent = 0.0
        if not self._spent:
            self._t0 = time.perf_counter()
        self._spent += units

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: torch.Tensor, plans: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, lengths: torch.Tensor | None = None, decide: Decide | None = None,
                all_logits: bool = False, capture: bool = False, resume: tuple[int, torch.Tensor] | None = None,
                ) -> ForwardOutput:
        """As `RoutedExecutor.forward` for a prefill (tokens [b, n] right-padded, every row starting at
        start[0]); the same logits, counts, captured states and cache contents."""
        b, n = tokens.shape
        L = self.n_layers
        if plans is None and decide is None:
            raise ValueError("forward needs plans or a decide callback")
        counts = torch.ones(b, L, dtype=torch.long) if plans is None else plans.cpu().long().clone()
        lengths_cpu = torch.full((b,), n, dtype=torch.long) if lengths is None else lengths.cpu().long()
        s0 = int(start.reshape(-1)[0])
        first, h = resume if resume is not None else (0, self.model.embed(tokens.to(self.model.device)))
        entering: list[torch.Tensor] | None = [] if capture else None
        for layer in range(first, L):
            if entering is not None:
                entering.append(h)
            if decide is not None:
                counts[:, layer] = torch.tensor(decided_counts(decide(layer, h, lengths_cpu)), dtype=torch.long)
            runs = int(counts[:, layer].max())
            if runs == 0:
                continue
            self.cache.reserve(max(s0 + n, self.reserve), [layer])  # this block's slots only (see above)
            out_h = torch.empty_like(h)  # [b, n, d], filled chunk by chunk
            for a in range(0, n, self.chunk_tokens):
                z = min(n, a + self.chunk_tokens)
                units = runs * self.cost(b, z - a, s0 + (a + z) / 2)
                self._spend(units)
                out = self.inner.forward(tokens[:, a:z], start + a, plans=counts, rows=rows,
                                         resume=(layer, h[:, a:z]), stop=layer + 1)
                assert out.hidden is not None
                out_h[:, a:z] = out.hidden
                if out_h.device.type == "cuda":  # kernels run asynchronously: the slice's clock must see the work
                    torch.cuda.synchronize(out_h.device)
            h = out_h
        if all_logits:  # [b, n, V]: the head over every prompt token is a prefill's worth of work: chunk it
            parts = []
            for a in range(0, n, self.chunk_tokens):
                z = min(n, a + self.chunk_tokens)
                self._spend(b * (z - a) * self.head_units)
                parts.append(self.inner.head(h[:, a:z]))
            logits = torch.cat(parts, 1)
        else:
            dev = h.device
            logits = self.inner.head(h[torch.arange(b, device=dev), (lengths_cpu - 1).to(dev)])
        if self._spent:  # the admitting step (cache row move, first token) gets a slice of its own
            self._pause()
            self._spent = 0.0
        return ForwardOutput(logits=logits, counts=counts, entering=entering)

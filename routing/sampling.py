"""Sampling parameters and next-token selection for one row (greedy, temperature, top-k, top-p, seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None = off; k >= 0: chosen token plus k alternatives
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return g


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: list[int], n_generated: int,
                   eos_ids: tuple[int, ...]) -> torch.Tensor:
    """logits [V] (float32) -> processed logits [V] before sampling (penalties, min_tokens, top-k/p)."""
    if (params.repetition_penalty != 1.0 and seen) or n_generated < params.min_tokens:
        logits = logits.clone()  # the caller's logits stay raw (logprobs are reported from them)
    if params.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if n_generated < params.min_tokens:
        for e in (*eos_ids, *params.stop_token_ids):
            if 0 <= e < logits.shape[0]:
                logits[e] = float("-inf")
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def choose(processed: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    if params.greedy:
        return int(torch.argmax(processed))
    probs = torch.softmax(processed, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))

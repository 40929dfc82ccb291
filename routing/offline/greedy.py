"""Batched greedy decoding along fixed per-row plans, for the offline pipeline (fidelity answers and routed
answers in evaluation). The server's engine has its own loop with sampling and streaming; this one only
needs argmax tokens, so it stays a dozen lines over the executor and its KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..executor import RoutedExecutor, pad_right
from ..model import BaseModel

Plan = tuple[int, ...]


@torch.inference_mode()
def greedy_answers(model: BaseModel, prompts: Sequence[Sequence[int]], plans: Sequence[Plan],
                   max_new_tokens: int = 48, batch: int = 16, progress: bool = False) -> list[list[int]]:
    """-> for each prompt, its greedy continuation along its plan (token ids, EOS excluded), at most
    `max_new_tokens` tokens; decoding of a row stops at its first EOS."""
    if len(prompts) != len(plans):
        raise ValueError("one plan per prompt")
    eos = set(model.eos_token_ids)
    out: list[list[int]] = []
    longest = max((len(p) for p in prompts), default=1)
    ex = RoutedExecutor(model, max_batch=batch, capacity=longest + max_new_tokens + 1)
    chunks = range(0, len(prompts), batch)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="greedy", unit="batch")
    for k in chunks:
        ps, pl = prompts[k:k + batch], torch.tensor(list(plans[k:k + batch]), dtype=torch.long)
        tokens, lengths = pad_right(ps)
        b = len(ps)
        nxt = ex.forward(tokens, torch.zeros(b, dtype=torch.long), plans=pl, lengths=lengths).logits.argmax(-1)
        answers: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        pos = lengths.clone()
        for step in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in eos:
                        done[i] = True
                    else:
                        answers[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            nxt = ex.forward(nxt[:, None].cpu(), pos, plans=pl).logits.argmax(-1)
            pos += 1
        out += answers
    return out

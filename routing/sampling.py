"""Sampling parameters and batched next-token selection over [b, V] logits.

`sample()` handles a whole batch with tensor operations and one host synchronisation (the final
`.tolist()`): repetition penalty, `min_tokens`, temperature, top-k, top-p, min-p, greedy rows, and the
logprobs of the chosen token and its top alternatives.

Safety (no request can produce NaN or inf, so none can fail another): temperatures below
`MIN_TEMPERATURE` are greedy (as vLLM's `_SAMPLING_EPS`), larger ones are capped at `MAX_TEMPERATURE`;
the repetition penalty is clamped into `PENALTY_RANGE`; top-p/top-k/min-p always keep the most likely
token. A row whose logits are not finite anyway (a broken model) is reported with an error; the other
rows are unaffected.

Randomness is counter-based: the uniform number for a row's k-th token is splitmix64 (Steele et al.,
"Fast splittable pseudorandom number generators", OOPSLA 2014) of its full 64-bit seed and k, and the
token is drawn by inverse-CDF sampling. A row's draws depend only on its own seed, step and logits (not on
the batch around it or on the device's generator), equal seeds reproduce and seeds differing in any of
their 64 bits differ.

Top-p and top-k work on the `CANDIDATES` most likely tokens (a `topk`, not a full sort of the vocabulary,
which costs 40 ms at batch 8 on a CPU). A row whose kept set may reach past them (a flat distribution) is
redone exactly after the synchronisation (among 16x as many, then the whole vocabulary); the result is the
same either way.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MIN_TEMPERATURE = 1e-5  # below: greedy
MAX_TEMPERATURE = 1e4  # above: capped (the distribution is uniform to float32 precision long before)
PENALTY_RANGE = (1e-6, 1e6)  # repetition_penalty is clamped into this range
CANDIDATES = 256  # tokens considered by top-k/top-p before the exact fallback
MIN_LOGPROB = -9999.0  # a logprob of -inf is reported as this (JSON has no infinity; as vLLM)
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingParams:
    """One sequence's sampling settings (OpenAI/vLLM names). Raises ValueError for values outside their
    domain (negative, non-finite, out of range)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token); 0 = off
    seed: int | None = None  # any integer; reduced modulo 2**64
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # EOS, stop token ids and stop strings are held off until this many tokens
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None = off; k >= 0: chosen token plus k alternatives
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.min_tokens < 0 or self.min_tokens > max(self.max_tokens, 0):
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p cut the distribution (those rows are sampled among the most likely
        tokens, in descending order; the others over the vocabulary in id order)."""
        return self.top_p < 1.0 or self.top_k > 0 or self.min_p > 0


def new_seed() -> int:
    """A fresh random 64-bit seed for a request that brings none."""
    return secrets.randbits(64)


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request with `n` > 1 choices and seed `seed`: `seed` itself for the
    first choice (so n=1 and the first of n choices agree), a splitmix64 hash of (seed, index) for the
    others, in [0, 2**63) so that a client can send it as a seed and get that choice alone. Not
    `seed + index`: that would make choice 1 of seed 7 repeat choice 0 of seed 8."""
    if index == 0:
        return seed
    return _mix64((_mix64(seed & _MASK64) ^ (index * 0xD1B54A32D192ED03)) & _MASK64) >> 1


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, step: int) -> float:
    """The `step`-th uniform number in [0, 1) of the stream for a 64-bit `seed` (splitmix64 of a mixed key;
    53 random bits)."""
    state = (_mix64(seed & _MASK64) + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    return (_mix64(state) >> 11) * 2.0**-53


@dataclass
class SampleRow:
    """What `sample` needs to know about one row."""

    params: SamplingParams
    seed: int
    step: int  # tokens generated so far (selects the random number, and holds off EOS below min_tokens)
    history: Sequence[int] = ()  # prompt + generated ids; read only when the repetition penalty is on
    blocked: tuple[int, ...] = ()  # token ids to forbid at this step (EOS and stop ids under min_tokens)


@dataclass(frozen=True)
class Sample:
    """One row's result. token_id is -1 and `error` says why when the row failed."""

    token_id: int
    logprob: float | None = None  # log-probability of the chosen token under the raw logits
    top: tuple[tuple[int, float], ...] = ()  # the `logprobs` most likely tokens (id, logprob)
    error: str | None = None


def sample(logits: torch.Tensor, rows: Sequence[SampleRow], candidates: int = CANDIDATES) -> list[Sample]:
    """Next tokens for a batch. logits: [b, V] raw scores (any float dtype, any device); one row per entry of
    `rows`. Logprobs are reported from the raw logits (before penalties and temperature), as vLLM does."""
    b, V = logits.shape
    dev = logits.device
    x = logits.float()
    params = [r.params for r in rows]
    proc = _penalised(x, rows)
    best, token = proc.max(-1)  # greedy choice; max propagates NaN, so `best` also tells a broken row
    bad = ~torch.isfinite(best)
    refine = torch.zeros(b, dtype=torch.bool, device=dev)
    u = torch.tensor([uniform(r.seed, r.step) for r in rows], dtype=torch.float32, device=dev)
    for subset in ([i for i, p in enumerate(params) if not p.greedy and p.truncates],
                   [i for i, p in enumerate(params) if not p.greedy and not p.truncates]):
        if not subset:
            continue
        idx = torch.tensor(subset, device=dev)
        z = proc[idx] / _column([min(params[i].temperature, MAX_TEMPERATURE) for i in subset], dev)
        if params[subset[0]].truncates:
            tok, ok, more = _sample_truncated(z, [params[i] for i in subset], u[idx], min(candidates, V))
            refine[idx] = more
        else:
            tok, ok = _sample_full(z, u[idx])
        token[idx] = tok
        bad[idx] |= ~ok
    k = max((p.logprobs or 0 for p in params), default=0)
    want_lp = any(p.logprobs is not None for p in params)
    cols = [token.double()[:, None], bad.double()[:, None], refine.double()[:, None]]
    if want_lp:
        lse = torch.logsumexp(x, -1, keepdim=True)
        cols.append(x.gather(1, token.clamp(0, V - 1)[:, None]) - lse)
        if k:
            top_v, top_i = torch.topk(x, min(k, V), -1)
            cols += [top_i.double(), top_v - lse]
    packed = torch.cat([c.double() for c in cols], 1).tolist()  # the step's one host synchronisation
    out = []
    for i, row in enumerate(packed):
        p = params[i]
        if row[1]:
            out.append(Sample(-1, error="the model produced non-finite scores for this sequence"))
            continue
        tok = int(row[0])
        lp = row[3] if want_lp else None
        if row[2]:  # the kept set reached past the candidates: redo this row exactly
            tok = _exact(proc[i], p, float(u[i]))
            lp = None if not want_lp else float(x[i, tok] - torch.logsumexp(x[i], -1))
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            n = min(p.logprobs, V)
            top = tuple((int(t), _finite(v)) for t, v in zip(row[4:4 + n], row[4 + k:4 + k + n], strict=True))
        out.append(Sample(tok, None if p.logprobs is None else _finite(lp), top))  # type: ignore[arg-type]
    return out


def _finite(lp: float) -> float:
    return lp if lp > MIN_LOGPROB else MIN_LOGPROB


def _column(values: list[float], dev: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]


def _penalised(x: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Repetition penalty (CTRL, Keskar et al. 2019, as in transformers and vLLM: positive scores of seen
    tokens divided by the penalty, negative ones multiplied) and blocked tokens. x itself is left raw."""
    pen = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0 and r.history]
    blocked = [(i, t) for i, r in enumerate(rows) for t in r.blocked if 0 <= t < x.shape[1]]
    if not pen and not blocked:
        return x
    x = x.clone()
    dev = x.device
    if pen:
        lo, hi = PENALTY_RANGE
        n = max(len(rows[i].history) for i in pen)
        hist = torch.tensor([list(rows[i].history) + [rows[i].history[0]] * (n - len(rows[i].history))
                             for i in pen], device=dev)
        seen = torch.zeros(len(pen), x.shape[1], dtype=torch.bool, device=dev).scatter_(1, hist, True)
        ix = torch.tensor(pen, device=dev)
        sub = x[ix]
        penalty = _column([min(max(rows[i].params.repetition_penalty, lo), hi) for i in pen], dev)
        x[ix] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if blocked:
        r, t = zip(*blocked, strict=True)
        x[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] = float("-inf")
    return x


def _pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: weights [n, K] >= 0 (unnormalised), u [n] in [0, 1) -> column index [n]. Columns of
    weight 0 are never picked (the CDF does not rise there); at the float edge u*total == total the draw
    falls back to the last column with weight."""
    cdf = weights.cumsum(-1)
    j = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True).clamp_(max=weights.shape[1] - 1)
    last = (weights > 0).cumsum(-1).argmax(-1, keepdim=True)  # the first column reaching the final count
    return torch.where(weights.gather(1, j) > 0, j, last).squeeze(1)


def _keep(probs: torch.Tensor, ps: list[SamplingParams], dev: torch.device) -> torch.Tensor:
    """probs [n, K] sorted descending (true probabilities) -> bool mask of the kept tokens: the smallest set
    reaching top_p, at most top_k, and at least min_p times the top probability; the first always."""
    K = probs.shape[1]
    top_p = _column([p.top_p for p in ps], dev)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else K for p in ps], device=dev)[:, None]
    min_p = _column([p.min_p for p in ps], dev)
    keep = (probs.cumsum(-1) - probs) < top_p
    keep &= torch.arange(K, device=dev)[None, :] < top_k
    keep &= probs >= min_p * probs[:, :1]
    keep[:, 0] = True
    return keep


def _sample_truncated(z: torch.Tensor, ps: list[SamplingParams], u: torch.Tensor, K: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k/top-p/min-p rows among the K most likely tokens -> (token [n], ok [n], needs the exact path [n])."""
    dev = z.device
    lse = torch.logsumexp(z, -1, keepdim=True)
    vals, order = torch.topk(z, K, -1)
    probs = (vals - lse).exp()
    keep = _keep(probs, ps, dev)
    reach = torch.tensor([p.top_k <= 0 or p.top_k > K for p in ps], device=dev)
    more = keep[:, -1] & reach & (K < z.shape[1])
    tok = order.gather(1, _pick(probs * keep, u)[:, None]).squeeze(1)
    return tok, torch.isfinite(lse.squeeze(1)), more


def _sample_full(z: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that do not truncate: over the whole vocabulary in id order -> (token [n], ok [n])."""
    probs = torch.softmax(z, -1)
    return _pick(probs, u), torch.isfinite(probs.sum(-1))


def _exact(proc: torch.Tensor, p: SamplingParams, u: float) -> int:
    """One truncating row whose kept set reached past the candidates (the fallback of `_sample_truncated`):
    among 16x as many, then, if those are not enough either, over the whole sorted vocabulary."""
    z = proc[None, :] / min(p.temperature, MAX_TEMPERATURE)
    ut = torch.tensor([u], device=z.device)
    tok, _, more = _sample_truncated(z, [p], ut, min(16 * CANDIDATES, z.shape[1]))
    if bool(more):
        tok, _, _ = _sample_truncated(z, [p], ut, z.shape[1])
    return int(tok)

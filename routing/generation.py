"""Batched generation along per-row layer plans: the step loop shared by `drllm generate` and the server.

`BatchGenerator.step()` either admits waiting sequences (one batched prefill, which also fixes each row's
plan) or decodes one token for every running row. Finished rows leave at once; the running rows are kept
as a contiguous prefix of the cache rows so decode steps read cache views, not gathers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .executor import RoutedExecutor, pad_right
from .model import BaseModel
from .plan import LayerPlan
from .planner import FixedPlanner, Planner, PlanRequest, plans_tensor
from .sampling import SamplingParams, choose, make_generator, process_logits

_ids = itertools.count()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    plan: LayerPlan | None = None
    routing: str = "auto"
    budget: float | None = None
    prompt_logprobs: bool = False  # logprobs of the prompt tokens too (for echo)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Sequence:
    request: GenerationRequest
    seq_id: int = field(default_factory=lambda: next(_ids))
    row: int = -1
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""  # generated text so far (stop strings cut off)
    emitted: int = 0  # characters of `text` already handed out as deltas
    finish_reason: str | None = None
    plan: LayerPlan | None = None
    decisions: list[list[float]] | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_admit: float | None = None
    t_first: float | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)


@dataclass
class TokenEvent:
    seq: Sequence
    token_id: int | None  # None: finished without a new token (abort, max_tokens=0)
    text_delta: str
    finished: bool


class BatchGenerator:
    def __init__(self, model: BaseModel, max_batch: int = 8, planner: Planner | None = None,
                 attn_impl: str = "sdpa", no_cache: bool = False, max_context: int | None = None) -> None:
        self.model = model
        self.executor = RoutedExecutor(model, max_batch=max_batch, attn_impl=attn_impl)
        self.planner = planner or FixedPlanner()
        self.max_batch = max_batch
        self.no_cache = no_cache
        self.max_context = max_context or model.spec.max_context
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].row == i
        self._aborts: set[int] = set()
        self._lock = threading.Lock()

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Sequence:
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + request.params.max_tokens > self.max_context:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({request.params.max_tokens}) exceeds the "
                             f"model's context of {self.max_context} tokens")
        if request.plan is not None:
            request.plan.check_length(self.model.spec.n_layers)
        seq = Sequence(request)
        seq.generator = make_generator(request.params.seed, self.model.device)
        with self._lock:
            self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Thread-safe: the sequence leaves at the next step."""
        with self._lock:
            self._aborts.add(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborts)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events = self._apply_aborts()
        with self._lock:
            free = self.max_batch - len(self.running)
            admit = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if admit:
            events += self._prefill(admit)
        elif self.running:
            events += self._decode()
        self._release_finished()
        return events

    def run_to_completion(self) -> None:
        while self.has_work():
            self.step()

    def _apply_aborts(self) -> list[TokenEvent]:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            waiting_hit = [s for s in self.waiting if s.seq_id in aborts]
            for s in waiting_hit:
                self.waiting.remove(s)
        events = []
        for s in waiting_hit + [s for s in self.running if s.seq_id in aborts]:
            if not s.finished:
                s.finish_reason = "abort"
                events.append(TokenEvent(s, None, "", True))
        self._release_finished()
        return events

    def _release_finished(self) -> None:
        """Drop finished rows, moving the last running rows into the holes (cache rows stay a prefix)."""
        keep = [s for s in self.running if not s.finished]
        if len(keep) == len(self.running):
            return
        for new_row, s in enumerate(keep):
            if s.row != new_row:
                self.executor.cache.move_row(s.row, new_row)
                s.row = new_row
        self.running = keep

    def _prefill(self, seqs: list[Sequence]) -> list[TokenEvent]:
        base = len(self.running)
        for i, s in enumerate(seqs):
            s.row, s.t_admit = base + i, time.monotonic()
        tokens, lengths = pad_right([s.request.prompt_ids for s in seqs])
        rows = torch.arange(base, base + len(seqs))
        want_all = any(s.request.prompt_logprobs for s in seqs)
        reqs = [PlanRequest(s.request.plan, s.request.routing, s.request.budget) for s in seqs]
        res = self.planner.prefill(self.executor, tokens, rows, lengths, reqs, all_logits=want_all)
        self.running.extend(seqs)
        events = []
        for i, s in enumerate(seqs):
            s.plan, s.decisions = res.plans[i], res.decisions[i]
            logits = res.logits[i]
            if want_all:
                if s.request.prompt_logprobs:
                    s.prompt_logprobs = _prompt_logprobs(logits, s.request.prompt_ids, s.request.params.logprobs)
                logits = logits[int(lengths[i]) - 1]
            if s.request.params.max_tokens == 0:
                s.finish_reason = "length"
                events.append(TokenEvent(s, None, "", True))
                continue
            events.append(self._accept(s, logits))
        return events

    def _decode(self) -> list[TokenEvent]:
        seqs = self.running
        plans = plans_tensor([s.plan for s in seqs])  # type: ignore[misc]
        if self.no_cache:  # reference path: recompute every row's whole sequence along its plan
            tokens, lengths = pad_right([s.request.prompt_ids + s.generated for s in seqs])
            out = self.executor.forward(tokens, torch.zeros(len(seqs), dtype=torch.long), plans=plans,
                                        lengths=lengths)
        else:
            tokens = torch.tensor([[s.generated[-1]] for s in seqs])
            start = torch.tensor([s.length - 1 for s in seqs])
            out = self.executor.forward(tokens, start, plans=plans)
        return [self._accept(s, out.logits[i]) for i, s in enumerate(seqs)]

    def _accept(self, s: Sequence, logits: torch.Tensor) -> TokenEvent:
        """Sample the next token for `s` from its raw logits [V] and update its state."""
        p = s.request.params
        logits = logits.float()
        processed = process_logits(logits, p, s.request.prompt_ids + s.generated, len(s.generated),
                                   self.model.eos_token_ids)
        tok = choose(processed, p, s.generator)  # type: ignore[arg-type]
        if s.t_first is None:
            s.t_first = time.monotonic()
        s.generated.append(tok)
        if p.logprobs is not None:
            s.logprobs.append(_logprob_entry(torch.log_softmax(logits, -1), tok, p.logprobs))
        reason = None
        eos = tok in self.model.eos_token_ids and not p.ignore_eos
        if eos or tok in p.stop_token_ids:
            reason = "stop"
        text = self._detok(s.generated[:-1] if eos else s.generated)
        if p.stop:
            cut = _find_stop(text, p.stop, max(0, len(s.text) - max(map(len, p.stop))))
            if cut is not None:
                text, reason = text[:cut], "stop"
        if reason is None and (len(s.generated) >= p.max_tokens or s.length >= self.max_context):
            reason = "length"
        s.text = text
        s.finish_reason = reason
        delta = self._delta(s)
        return TokenEvent(s, tok, delta, reason is not None)

    def _detok(self, ids: list[int]) -> str:
        tok = self.model.tokenizer
        if tok is None:
            return ""
        return tok.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    @staticmethod
    def _delta(s: Sequence) -> str:
        """New text safe to hand out: hold back an unfinished UTF-8 character and a possible stop prefix."""
        end = len(s.text)
        if not s.finished:
            if s.text.endswith("\ufffd"):
                end -= 1
            if s.request.params.stop:
                end -= max(map(len, s.request.params.stop)) - 1
        if end <= s.emitted:
            return ""
        delta, s.emitted = s.text[s.emitted:end], end
        return delta


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _logprob_entry(logprobs: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, idx = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for v, i in zip(vals, idx, strict=True)]
    return TokenLogprob(tok, float(logprobs[tok]), top)


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int | None) -> list[TokenLogprob | None]:
    lp = torch.log_softmax(logits.float(), -1)  # [n, V]
    out: list[TokenLogprob | None] = [None]
    for j in range(1, len(prompt)):
        out.append(_logprob_entry(lp[j - 1], prompt[j], k or 0))
    return out

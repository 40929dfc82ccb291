"""Batched generation along per-row layer plans: the step loop shared by `drllm generate` and the server.

`BatchGenerator.step()` either admits waiting sequences (one batched prefill, which also fixes each row's
plan) or decodes one token for every running row, and returns one immutable `SequenceOutput` per sequence
that moved (new token ids, text delta, logprobs, finish reason, routing report). Callers read only these
values; a `Sequence` is the generator's own mutable state. Finished rows leave at once; running rows are
kept as a contiguous prefix of the cache rows so decode steps read cache views, not gathers.

Isolation: sampling is batched and cannot produce NaN (see `routing.sampling`); a row whose logits are not
finite, or whose text processing raises, finishes alone with `finish_reason="error"`. An exception in a
prefill fails only the sequences being admitted; one in a decode step fails the running rows, never the
waiting ones.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .chunked_prefill import LayerMajorExecutor, SteppedCall
from .detokenize import IncrementalDetokenizer, StopStrings, TokenNames, decode_with_offsets
from .executor import RoutedExecutor, pad_right
from .model import BaseModel
from .plan import LayerPlan
from .planner import FixedPlanner, Planner, PlanRequest, PrefillResult, plans_tensor
from .sampling import MIN_LOGPROB, Sample, SampleRow, SamplingParams, new_seed, sample

log = logging.getLogger(__name__)
_ids = itertools.count()
# chunked prefill: tokens per block call (and, times L, token-block units per step), by device. On a CPU a
# decode step costs about as much as a 32-token prefill.
CHUNK_TOKENS = {"cpu": 32, "cuda": 512}
# chunked prefill: seconds per step on the prompt, as a multiple of the running rows' recent decode step. A
# running stream's gap is then about 1 + SLICE_RATIO decode steps, which leaves room under the 3x target for
# decode steps that run slow (a shared CPU, a noisy neighbour); more would shorten the long prompt's TTFT.
SLICE_RATIO = 0.75

SCHEDULERS = ("fifo", "plan")
# a prefill call's fixed cost in token-rows of compute, by device: on a CPU every call reads all the weights
# (~90 ms for the default model in float32) and a token-row costs ~3 ms at large batches (measured, 1 thread);
# on a GPU padding is nearly free
PREFILL_CALL_TOKENS = {"cpu": 48, "cuda": 4096}


def length_groups(lengths: list[int], call_tokens: int) -> list[list[int]]:
    """Split prompts into right-padded prefill calls: indices into `lengths`, grouped by similar length.

    Minimises the sum over calls of call_tokens + rows x longest prompt (exact, by dynamic programming over
    the prompts sorted by length: an optimal group is a run of that order). One call when padding is cheap;
    e.g. lengths [5, 6, 8, 35] with call_tokens 16 -> [[5, 6, 8], [35]] (16 + 24 + 16 + 35 < 16 + 140)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + call_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]: j])
        j = cut[j]
    return groups[::-1]


class ContextLengthError(ValueError):
    """The prompt plus max_tokens does not fit the model's context. `param` names what to shorten: "prompt"
    when the prompt alone leaves no room for a token, else "max_tokens"."""

    def __init__(self, message: str, param: str = "max_tokens") -> None:
        super().__init__(message)
        self.param = param


def check_context(n_prompt: int, max_tokens: int, max_context: int) -> None:
    """The one context-length rule: prompt + max_tokens <= the model's context. Raises ContextLengthError."""
    if n_prompt + max_tokens <= max_context:
        return
    if n_prompt + min(max_tokens, 1) > max_context:
        raise ContextLengthError(f"the prompt ({n_prompt} tokens) is longer than the model's context of "
                                 f"{max_context} tokens" if n_prompt > max_context else
                                 f"the prompt ({n_prompt} tokens) fills the model's context of {max_context} "
                                 "tokens and leaves no room for max_tokens", "prompt")
    raise ContextLengthError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {max_context} tokens", "max_tokens")


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    plan: LayerPlan | None = None
    routing: str = "auto"
    budget: float | None = None
    prompt_logprobs: bool = False  # logprobs of the prompt tokens too (for echo)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's logprobs. `token` names the token for display (see `routing.detokenize.TokenNames`);
    `text_offset` counts characters of the sequence's text before it (the prompt's text for prompt tokens,
    the generated text for generated ones); `top` holds the k most likely (id, name, logprob)."""

    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token (nothing predicts it)
    text_offset: int
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class RoutingReport:
    plan: LayerPlan
    decision_probs: tuple[tuple[float, ...], ...] | None  # routers' per-layer (skip, execute, repeat)


@dataclass(frozen=True)
class SequenceOutput:
    """What one step did to one sequence (an immutable value, safe to hand to another thread)."""

    seq_id: int
    num_prompt_tokens: int
    num_generated_tokens: int  # so far, including this step's
    token_ids: tuple[int, ...] = ()  # new this step
    text: str = ""  # new text this step (text held back for a possible stop string comes later)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token when logprobs were asked for
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # first output only, when asked for
    routing: RoutingReport | None = None  # on the first output after the prefill that fixed the plan
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Sequence:
    """The generator's mutable state of one sequence (read it only from the thread that steps)."""

    request: GenerationRequest
    seq_id: int = field(default_factory=lambda: next(_ids))
    row: int = -1
    seed: int = 0
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # generated text so far (cut at a stop string)
    emitted: int = 0  # characters of `text` already handed out
    finish_reason: str | None = None
    error: str | None = None
    plan: LayerPlan | None = None
    expected: tuple[int, ...] | None = None  # the plan expected before the prefill (plan-aware admission)
    decisions: list[list[float]] | None = None
    t_submit: float = field(default_factory=time.monotonic)
    t_admit: float | None = None
    t_first: float | None = None
    detok: IncrementalDetokenizer | None = None
    reported: bool = False  # its first output (with the routing report and prompt logprobs) went out
    stops: StopStrings = field(default_factory=lambda: StopStrings(()))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.generated)


class BatchGenerator:
    def __init__(self, model: BaseModel, max_batch: int = 8, planner: Planner | None = None,
                 attn_impl: str = "sdpa", no_cache: bool = False, max_context: int | None = None,
                 long_prompt: int | None = None, chunk_tokens: int | None = None,
                 prefill_budget: float | None = None, slice_ratio: float = SLICE_RATIO, scheduler: str = "fifo",
                 max_wait_s: float = 2.0) -> None:
        """long_prompt: prompts with more tokens are prefilled in chunks between decode steps (see
        `routing.chunked_prefill`; None: never, the right choice for offline batches), chunk_tokens tokens at
        a time (default by device, `CHUNK_TOKENS`), at most prefill_budget cost units per step (default
        chunk_tokens x L; a unit is one token through one block, attention included) and, while rows are
        running, at most slice_ratio x their recent decode step in seconds: a running stream's gap is then
        about (1 + slice_ratio) decode steps.

        scheduler: which waiting sequences take the free rows. "fifo": arrival order. "plan": plan-aware
        (see `_plan_order`): those whose expected plan adds the fewest blocks to the batch's union first,
        except that a sequence waiting max_wait_s seconds or more goes before all others (in arrival
        order), so none starves."""
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}")
        self.scheduler, self.max_wait_s = scheduler, max_wait_s
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
        self._names = TokenNames(model.tokenizer) if model.tokenizer is not None else None
        self.chunk_tokens = chunk_tokens or CHUNK_TOKENS.get(model.device.type, CHUNK_TOKENS["cuda"])
        self.long_prompt = long_prompt
        self.prefill_budget = prefill_budget or self.chunk_tokens * model.spec.n_layers
        self.slice_ratio = slice_ratio
        self._long: tuple[Sequence, SteppedCall, torch.Tensor, bool] | None = None  # the chunked prefill
        self._decode_s = 0.0  # recent decode step time (moving average), paces a chunked prefill

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a request. Raises ValueError (ContextLengthError for the context rule) for a bad request."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        check_context(n, request.params.max_tokens, self.max_context)
        if request.plan is not None:
            request.plan.check_length(self.model.spec.n_layers)
        seq = Sequence(request)
        seq.seed = request.params.seed if request.params.seed is not None else new_seed()
        seq.stops = StopStrings(request.params.stop)
        with self._lock:
            self.waiting.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Thread-safe: the sequence leaves at the next step."""
        with self._lock:
            self._aborts.add(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborts or self._long)

    @property
    def num_running(self) -> int:
        """Sequences holding a cache row: the running rows and a chunked prefill in progress."""
        return len(self.running) + (self._long is not None)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self) -> list[SequenceOutput]:
        """One engine step: admit short prompts (one batched prefill) or decode the running rows, and advance
        a long prompt's chunked prefill by one step's budget."""
        outputs = self._apply_aborts()
        admit, long = self._admissions()
        if long is not None:
            self._start_long(long)
        if admit:
            outputs += self._guarded(self._prefill, admit)
        elif self.running:
            outputs += self._guarded(self._decode, list(self.running))
        if self._long is not None:
            outputs += self._guarded(self._advance_long, [self._long[0]])
        self._release_finished()
        return outputs

    def _admissions(self) -> tuple[list[Sequence], Sequence | None]:
        """Waiting sequences to admit now, in order: short prompts into free rows; the first long prompt (more
        than `long_prompt` tokens) starts a chunked prefill in the top row when none is running (short ones
        may pass a long one that has to wait)."""
        with self._lock:
            long_row = 1 if self._long is not None else 0
            free = self.max_batch - len(self.running) - long_row
            admit: list[Sequence] = []
            long = None
            queue = list(self.waiting)
            if self.scheduler == "plan" and 0 < free < len(queue):  # with no free row the order is moot
                queue = self._plan_order(queue, free)
            for s in queue:
                if self.long_prompt is not None and len(s.request.prompt_ids) > self.long_prompt \
                        and not self.no_cache:
                    if long is None and self._long is None and free - len(admit) >= 1:
                        long, free = s, free - 1
                        self.waiting.remove(s)
                    continue
                if len(admit) >= free:
                    break
                admit.append(s)
                self.waiting.remove(s)
        return admit, long

    def _plan_order(self, queue: list[Sequence], free: int) -> list[Sequence]:
        """Plan-aware admission order for more waiting sequences than free rows.

        In a decode step a block costs a row-independent part (reading its weights: ~1 ms of a 86 ms step at
        batch 8 on CPU, i.e. ~4 rows' compute) whenever any row executes it, plus its rows' compute (the
        executor runs a block only for its rows). So rows that skip the same blocks should decode together:
        greedily, the next row is the waiting one whose expected plan (`Planner.expected_plan`: exact for
        fixed and full plans, the budget's static order for budgeted ones; the routers' own skips are known
        only after the prefill) adds the fewest blocks to the union of the running rows and those already
        chosen, ties in arrival order. Aging bounds the wait: sequences waiting max_wait_s or more come
        first, in arrival order."""
        now = time.monotonic()
        L = self.model.spec.n_layers
        aged = [s for s in queue if now - s.t_submit >= self.max_wait_s]
        rest = [s for s in queue if now - s.t_submit < self.max_wait_s]
        union = [False] * L
        for s in self.running + aged[:free]:
            for layer, c in enumerate(self._expected(s)):
                union[layer] = union[layer] or c > 0
        chosen: list[Sequence] = []
        while rest and len(aged) + len(chosen) < free:
            best = min(range(len(rest)), key=lambda i: (sum(c > 0 and not union[j]
                                                            for j, c in enumerate(self._expected(rest[i]))), i))
            s = rest.pop(best)
            chosen.append(s)
            for layer, c in enumerate(self._expected(s)):
                union[layer] = union[layer] or c > 0
        return aged + chosen + rest

    def _expected(self, s: Sequence) -> tuple[int, ...]:
        """A sequence's plan once fixed, else what its planner expects (cached on the sequence)."""
        if s.plan is not None:
            return s.plan.counts
        if s.expected is None:
            req = PlanRequest(s.request.plan, s.request.routing, s.request.budget)
            expect = getattr(self.planner, "expected_plan", None)
            s.expected = (expect(req, self.model.spec.n_layers).counts if expect is not None
                          else (1,) * self.model.spec.n_layers)
        return s.expected

    def close(self) -> None:
        """Unwind a chunked prefill in progress (its helper thread) when this generator is dropped."""
        if self._long is not None:
            self._long[1].cancel()
            self._long = None

    def run_to_completion(self) -> None:
        while self.has_work():
            self.step()

    def _guarded(self, run, seqs: list[Sequence]) -> list[SequenceOutput]:  # noqa: ANN001
        """Run a prefill or decode; if it raises, only its sequences fail (the batch's others go on)."""
        try:
            return run(seqs)
        except Exception as e:  # noqa: BLE001 - reported per sequence
            log.exception("generation: a %s step failed for %d sequences", run.__name__.strip("_"), len(seqs))
            out = []
            for s in seqs:
                if not s.finished:
                    out.append(self._fail(s, f"{type(e).__name__} while running this sequence"))
            return out

    def _fail(self, s: Sequence, message: str) -> SequenceOutput:
        s.finish_reason, s.error = "error", message
        return self._output(s, (), ())

    def _apply_aborts(self) -> list[SequenceOutput]:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            waiting_hit = [s for s in self.waiting if s.seq_id in aborts]
            for s in waiting_hit:
                self.waiting.remove(s)
        if self._long is not None and self._long[0].seq_id in aborts:
            waiting_hit.append(self._long[0])
            self._long[1].cancel()
            self._long = None
        outputs = []
        for s in waiting_hit + [s for s in self.running if s.seq_id in aborts]:
            if not s.finished:
                s.finish_reason = "abort"
                outputs.append(self._output(s, (), ()))
        self._release_finished()
        return outputs

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

    def _prefill(self, seqs: list[Sequence]) -> list[SequenceOutput]:
        """Prefill the admitted prompts: one right-padded forward per group of similar lengths
        (`length_groups`), so short prompts do not pay for the padding up to a long one."""
        now = time.monotonic()
        groups = length_groups([len(s.request.prompt_ids) for s in seqs],
                               PREFILL_CALL_TOKENS.get(self.model.device.type, PREFILL_CALL_TOKENS["cuda"]))
        outputs: list[SequenceOutput] = []
        for group in groups:
            part = [seqs[i] for i in group]
            base = len(self.running)
            for i, s in enumerate(part):
                s.row, s.t_admit = base + i, now
            tokens, lengths = pad_right([s.request.prompt_ids for s in part])
            rows = torch.arange(base, base + len(part))
            want_all = any(s.request.prompt_logprobs for s in part)
            reqs = [PlanRequest(s.request.plan, s.request.routing, s.request.budget) for s in part]
            res = self.planner.prefill(self.executor, tokens, rows, lengths, reqs, all_logits=want_all)
            self.running.extend(part)
            outputs += self._prefilled(part, res, lengths, want_all)
        return outputs

    def _start_long(self, s: Sequence) -> None:
        """Begin the layer-major chunked prefill of one long prompt in the top cache row."""
        s.row, s.t_admit = self.max_batch - 1, time.monotonic()
        tokens, lengths = pad_right([s.request.prompt_ids])
        rows = torch.tensor([s.row])
        want_all = s.request.prompt_logprobs
        req = PlanRequest(s.request.plan, s.request.routing, s.request.budget)

        # room for the answer too (up to the prompt's length again, what geometric growth would give), so the
        # row's first decode steps do not grow every block's cache at once
        n = len(s.request.prompt_ids)
        reserve = min(self.max_context, n + s.request.params.max_tokens, 2 * n)

        def time_budget() -> float | None:  # keep the running rows' pace: a slice costs ~slice_ratio decode steps
            return self.slice_ratio * self._decode_s if self.running and self._decode_s else None

        def run(pause: Callable[[], None]) -> PrefillResult:
            ex = LayerMajorExecutor(self.executor, pause, self.chunk_tokens, self.prefill_budget, time_budget,
                                    reserve)
            return self.planner.prefill(ex, tokens, rows, lengths, [req], all_logits=want_all)  # type: ignore[arg-type]

        self._long = (s, SteppedCall(run), lengths, want_all)

    def _advance_long(self, seqs: list[Sequence]) -> list[SequenceOutput]:
        assert self._long is not None
        s, call, lengths, want_all = self._long
        try:
            if not call.advance():
                return []
        except BaseException:
            call.cancel()
            raise
        finally:
            if call.done:
                self._long = None
        if call.error is not None:
            raise call.error
        new_row = len(self.running)  # join the running prefix
        self.executor.cache.move_row(s.row, new_row, len(s.request.prompt_ids))
        s.row = new_row
        self.running.append(s)
        return self._prefilled([s], call.result, lengths, want_all)

    def _prefilled(self, seqs: list[Sequence], res: PrefillResult, lengths: torch.Tensor, want_all: bool
                   ) -> list[SequenceOutput]:
        """After a prefill: fix plans, start detokenizers, prompt logprobs, and sample the first tokens."""
        logits = res.logits
        for i, s in enumerate(seqs):
            s.plan, s.decisions = res.plans[i], res.decisions[i]
            s.detok = IncrementalDetokenizer(self.model.tokenizer, s.request.prompt_ids, names=self._names) \
                if self.model.tokenizer is not None else None
            if s.request.prompt_logprobs:
                s.prompt_logprobs = self._prompt_logprobs(logits[i], s.request.prompt_ids, s.request.params.logprobs)
        if want_all:
            logits = logits[torch.arange(len(seqs)), (lengths - 1).to(logits.device)]
        outputs = []
        live = []
        for i, s in enumerate(seqs):
            if s.request.params.max_tokens == 0:
                s.finish_reason = "length"
                outputs.append(self._output(s, (), ()))
            else:
                live.append(i)
        if live:
            outputs += self._sample([seqs[i] for i in live], logits[torch.tensor(live, device=logits.device)])
        return outputs

    def _decode(self, seqs: list[Sequence]) -> list[SequenceOutput]:
        t0 = time.perf_counter()
        try:
            return self._decode_rows(seqs)
        finally:
            took = time.perf_counter() - t0
            self._decode_s = took if not self._decode_s else 0.8 * self._decode_s + 0.2 * took

    def _decode_rows(self, seqs: list[Sequence]) -> list[SequenceOutput]:
        plans = plans_tensor([s.plan for s in seqs])  # type: ignore[misc]
        if self.no_cache:  # reference path: recompute every row's whole sequence along its plan
            tokens, lengths = pad_right([s.request.prompt_ids + s.generated for s in seqs])
            out = self.executor.forward(tokens, torch.zeros(len(seqs), dtype=torch.long), plans=plans,
                                        lengths=lengths)
        else:
            tokens = torch.tensor([[s.generated[-1]] for s in seqs])
            start = torch.tensor([s.length - 1 for s in seqs])
            out = self.executor.forward(tokens, start, plans=plans)
        return self._sample(seqs, out.logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceOutput]:
        """Sample the next token of every row of logits [b, V] at once, then advance each sequence alone."""
        eos = self.model.eos_token_ids
        rows = []
        for s in seqs:
            p = s.request.params
            n = len(s.generated)
            rows.append(SampleRow(
                p, s.seed, n,
                history=(s.request.prompt_ids + s.generated) if p.repetition_penalty != 1.0 else (),
                blocked=(*eos, *p.stop_token_ids) if n < p.min_tokens else ()))
        outputs = []
        for s, smp in zip(seqs, sample(logits, rows), strict=True):
            try:
                outputs.append(self._advance(s, smp))
            except Exception as e:  # noqa: BLE001 - this row alone fails
                log.exception("generation: sequence %d failed after sampling", s.seq_id)
                outputs.append(self._fail(s, f"{type(e).__name__} while processing this sequence's output"))
        return outputs

    def _advance(self, s: Sequence, smp: Sample) -> SequenceOutput:
        """Append the sampled token, extend the text, check stop conditions; -> this step's output."""
        if smp.error is not None:
            return self._fail(s, smp.error)
        p = s.request.params
        tok = smp.token_id
        if s.t_first is None:
            s.t_first = time.monotonic()
        s.generated.append(tok)
        n = len(s.generated)
        offset = before = len(s.text)
        eos = tok in self.model.eos_token_ids and not p.ignore_eos
        reason = "stop" if eos or tok in p.stop_token_ids else None
        if not eos and s.detok is not None:
            piece, offset = s.detok.step(tok)
            s.text += piece
        if n >= p.min_tokens:  # min_tokens holds off stop strings too (as vLLM)
            cut = s.stops.find(s.text, before)
            if cut is not None:
                s.text, reason = s.text[:cut], "stop"
        if reason is None and (n >= p.max_tokens or s.length >= self.max_context):
            reason = "length"
        s.finish_reason = reason
        lps: tuple[TokenLogprob, ...] = ()
        if p.logprobs is not None:
            assert smp.logprob is not None
            entry = self._logprob_entry(tok, smp.logprob, offset, [(t, lp) for t, lp in smp.top])
            s.logprobs.append(entry)
            lps = (entry,)
        return self._output(s, (tok,), lps)

    def _output(self, s: Sequence, tokens: tuple[int, ...], lps: tuple[TokenLogprob, ...]) -> SequenceOutput:
        end = len(s.text) if s.finished else len(s.text) - s.stops.held(s.text)
        delta = ""
        if end > s.emitted:
            delta, s.emitted = s.text[s.emitted:end], end
        first, s.reported = not s.reported, True
        routing = None
        if first and s.plan is not None:
            probs = None if s.decisions is None else tuple(tuple(layer) for layer in s.decisions)
            routing = RoutingReport(s.plan, probs)
        prompt_lp = tuple(s.prompt_logprobs) if first and s.request.prompt_logprobs else None
        return SequenceOutput(
            seq_id=s.seq_id, num_prompt_tokens=len(s.request.prompt_ids), num_generated_tokens=len(s.generated),
            token_ids=tokens, text=delta, logprobs=lps, prompt_logprobs=prompt_lp, routing=routing,
            finish_reason=s.finish_reason, error=s.error)

    def _name(self, token_id: int) -> str:
        return self._names.name(token_id) if self._names is not None else f"token_id:{token_id}"

    def _logprob_entry(self, tok: int, logprob: float, offset: int, top: list[tuple[int, float]]) -> TokenLogprob:
        ids = [tok] + [t for t, _ in top]
        names = self._names.names(ids) if self._names is not None else [f"token_id:{t}" for t in ids]
        return TokenLogprob(tok, names[0], logprob, offset,
                            tuple((t, nm, lp) for (t, lp), nm in zip(top, names[1:], strict=True)))

    def _prompt_logprobs(self, logits: torch.Tensor, prompt: list[int], k: int | None) -> list[TokenLogprob]:
        """logits [n, V] of the prompt positions -> one entry per prompt token (logprob None for the first)."""
        n = len(prompt)
        lp = torch.log_softmax(logits[: n - 1].float(), -1)  # [n-1, V]: position j predicts token j+1
        target = torch.tensor(prompt[1:], device=lp.device)
        chosen = lp.gather(1, target[:, None]).squeeze(1).clamp(min=MIN_LOGPROB).tolist() if n > 1 else []
        top_v: list[list[float]] = [[] for _ in chosen]
        top_i: list[list[int]] = [[] for _ in chosen]
        if k and n > 1:
            v, i = torch.topk(lp, min(k, lp.shape[1]), -1)
            top_v, top_i = v.clamp(min=MIN_LOGPROB).tolist(), i.tolist()
        offsets = decode_with_offsets(self.model.tokenizer, prompt, self._names)[1] \
            if self.model.tokenizer is not None else [0] * n
        out = [TokenLogprob(prompt[0], self._name(prompt[0]), None, 0)]
        for j in range(1, n):
            out.append(self._logprob_entry(prompt[j], chosen[j - 1], offsets[j],
                                           list(zip(top_i[j - 1], top_v[j - 1], strict=True))))
        return out

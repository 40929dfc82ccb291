"""The engine: one thread owns the model and the `BatchGenerator`; requests talk to it through asyncio queues.

The event loop only submits and aborts (both thread-safe, no model calls). The engine thread loads the
model and routers, then loops: step the batch, hand each token event to its request's queue with
`loop.call_soon_threadsafe`, and report per-step stats.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from routing.generation import (
    CHUNK_TOKENS,
    BatchGenerator,
    ContextLengthError,
    GenerationRequest,
    Sequence,
    SequenceOutput,
)
from routing.model import BaseModel, load_model
from routing.planner import FixedPlanner, Planner
from routing.routers import RouterCheckpointError, RouterPlanner, load_routers
from routing.sampling import SamplingParams

from .errors import EngineFailure, EngineNotReady, QueueFull, RequestError
from .settings import ServerSettings
from .stats import ChoiceStats, NullStats, StatsSink, StepStats

log = logging.getLogger(__name__)


class EngineState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


def make_planner(spec: str, model: BaseModel) -> tuple[Planner, bool]:
    """(planner, routers loaded?) for `--routers PATH|default|none`. A missing default checkpoint falls back
    to no routers with a warning; an explicit path that fails raises."""
    if spec == "none":
        return FixedPlanner(), False
    try:
        return RouterPlanner(load_routers(spec, model)), True
    except RouterCheckpointError as e:
        if spec != "default":
            raise
        log.warning("routers: %s; serving without routers (full plans)", e)
        return FixedPlanner(), False


@dataclass
class RequestHandle:
    """The sequences of one HTTP request (one per prompt and choice, by choice index) and the queue their
    outputs arrive on. Holds ids only: the sequences themselves stay with the engine thread."""

    seq_ids: list[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, SequenceOutput] | BaseException] = field(default_factory=asyncio.Queue)

    async def outputs(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        """(choice index, output) until every sequence has finished; raises EngineFailure if the engine broke."""
        remaining = len(self.seq_ids)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item[1].finished:
                remaining -= 1
            yield item

    def push(self, item: tuple[int, SequenceOutput] | BaseException) -> None:
        """From the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class EngineClient(Protocol):
    """What the HTTP layer may use: facts about the served model, tokenization, submit and abort. Serving
    never touches a live sequence, the tokenizer or the model (a fake engine implements this in tests)."""

    @property
    def model_name(self) -> str: ...
    @property
    def has_routers(self) -> bool: ...
    @property
    def max_context(self) -> int: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def n_layers(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def model_source(self) -> str: ...
    def require_ready(self) -> None: ...
    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...
    def render_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...
    def submit(self, requests: list[GenerationRequest]) -> RequestHandle: ...
    def abort(self, handle: RequestHandle) -> None: ...


PROMPT_CHARS_SLACK = 4  # room for normalizers that fold several characters into one (NFKC compositions)


def prompt_char_bound(tokenizer: object, n_ids: int, max_context: int) -> int | None:
    """The most characters a prompt may have: PROMPT_CHARS_SLACK x `max_context` x the most characters one
    token decodes to. A text that fits the context is far shorter, so a longer one is refused before the
    tokenizer spends seconds on it. None (no bound) when the tokenizer cannot decode single ids."""
    try:
        longest = max(len(tokenizer.decode([i])) for i in range(n_ids))  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any tokenizer that cannot: no bound rather than a wrong one
        return None
    return PROMPT_CHARS_SLACK * max_context * max(1, longest)


@dataclass
class _Track:
    handle: RequestHandle
    index: int
    seq: Sequence
    admitted: bool = False
    last_token_t: float | None = None


class Engine:
    """Owns the model on one thread; implements `EngineClient` for the HTTP layer."""

    def __init__(self, settings: ServerSettings, model: BaseModel | None = None) -> None:
        self.settings = settings
        self.model = model  # given: used as is (tests); None: loaded by the engine thread
        self.stats: StatsSink = NullStats()
        self.on_failure: Callable[[BaseException], None] | None = None  # load failed (serve() exits)
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self.has_routers = False
        self.torch_threads: int | None = None  # set when loaded
        self.max_prompt_chars: int | None = None  # set when loaded (None: no bound; see prompt_char_bound)
        self._gen: BatchGenerator | None = None
        self._lock = threading.Lock()  # guards _tracks and submission
        self._tracks: dict[int, _Track] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- facts about the loaded model (READY only) -----------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.model.name if self.model is not None else self.settings.model

    def require_ready(self) -> None:
        if self.state is EngineState.FAILED:
            raise EngineNotReady(f"the model failed to load: {self.error}")
        if not self.ready:
            raise EngineNotReady("the model is loading; retry shortly")

    @property
    def loaded(self) -> BaseModel:
        self.require_ready()
        assert self.model is not None
        return self.model

    @property
    def max_context(self) -> int:
        return self._gen.max_context if self._gen is not None else self.loaded.spec.max_context

    @property
    def max_queue(self) -> int:
        return self.settings.max_queue

    @property
    def n_layers(self) -> int:
        return self.loaded.spec.n_layers

    @property
    def vocab_size(self) -> int:
        return self.loaded.spec.vocab_size

    @property
    def model_source(self) -> str:
        return self.loaded.source

    # --- tokenization (any thread: the tokenizers are thread-safe for encode/decode) ---------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`. Raises ContextLengthError, before tokenizing, for a text longer than
        `max_prompt_chars` (the tokenizer's time grows with the text, and none so long fits the context)."""
        self.check_prompt_chars(len(text))
        return list(self.loaded.tokenizer(text)["input_ids"])  # type: ignore[operator]

    def check_prompt_chars(self, n_chars: int, param: str = "prompt") -> None:
        """Raises ContextLengthError when a prompt of `n_chars` characters exceeds `max_prompt_chars`."""
        if self.max_prompt_chars is not None and n_chars > self.max_prompt_chars:
            raise ContextLengthError(
                f"the prompt ({n_chars} characters) is longer than this server takes: at most "
                f"{self.max_prompt_chars} characters ({PROMPT_CHARS_SLACK} x the model's context of "
                f"{self.max_context} tokens x the longest token's characters)", param)

    def detokenize(self, ids: list[int]) -> str:
        return self.loaded.tokenizer.decode(ids)  # type: ignore[attr-defined]

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for chat `messages` ({"role", "content"} dicts): the model's own chat template with
        the assistant's turn opened (transformers' `apply_chat_template`, add_generation_prompt=True). Raises
        RequestError when the model has no chat template or its template refuses the messages (400)."""
        tok = self.loaded.tokenizer
        self.check_prompt_chars(sum(len(str(m.get("content") or "")) for m in messages), "messages")
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"the model {self.model_name!r} has no chat template; use /v1/completions",
                               "messages")
        try:
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,  # type: ignore[attr-defined]
                                          return_dict=True)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError and friends: the template refused them
            raise RequestError(f"the chat template cannot render these messages: {e}", "messages") from e
        return list(enc["input_ids"])

    # --- lifetime ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- event-loop side --------------------------------------------------------------------------
    def submit(self, requests: list[GenerationRequest]) -> RequestHandle:
        """Queue the sequences of one HTTP request. Raises EngineNotReady, QueueFull or ValueError (bad request,
        ContextLengthError for the context rule; nothing is queued then)."""
        self.require_ready()
        handle = RequestHandle([], asyncio.get_running_loop())
        with self._lock:
            gen = self._gen
            assert gen is not None
            if len(gen.waiting) + len(requests) > self.settings.max_queue:
                raise QueueFull(f"the server's queue is full ({self.settings.max_queue} waiting sequences); "
                                "retry later")
            queued: list[Sequence] = []
            try:
                for i, req in enumerate(requests):
                    seq = gen.submit(req)
                    queued.append(seq)
                    handle.seq_ids.append(seq.seq_id)
                    self._tracks[seq.seq_id] = _Track(handle, i, seq)
            except ValueError:
                for seq in queued:  # withdraw the ones already queued, silently
                    self._tracks.pop(seq.seq_id, None)
                    gen.abort(seq)
                raise
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Cancel the handle's unfinished sequences (client gone); their rows free up at the next step."""
        with self._lock:  # only sequences still tracked live in the current batch
            pending = [self._tracks[i].seq for i in handle.seq_ids if i in self._tracks]
            for seq in pending:
                self._gen.abort(seq)  # type: ignore[union-attr]
        if pending:
            self._wake.set()

    # --- engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - reported through state/on_failure
            log.error("engine: loading failed: %s", e)
            self.error, self.state = e, EngineState.FAILED
            if self.on_failure is not None:
                self.on_failure(e)
            return
        self._loop()

    def _load(self) -> None:
        s = self.settings
        t0 = time.monotonic()
        if self.model is None:
            self.model = load_model(s.model, device=s.device, dtype=s.dtype, quantization=s.quantization)
        if self.model.device.type == "cpu":
            _set_cpu_threads(s.torch_threads)
        self.torch_threads = torch.get_num_threads()
        planner, self.has_routers = make_planner(s.routers, self.model)
        self._gen = self._new_generator(planner)
        self.max_prompt_chars = prompt_char_bound(self.model.tokenizer, self.model.spec.vocab_size,
                                                  self._gen.max_context)
        self._gen.submit(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=2, temperature=0)))
        self._gen.run_to_completion()  # warm-up, so the first request does not pay for lazy init
        self.stats.on_ready(self.model_name, self.model.spec.n_layers)
        self.state = EngineState.READY
        log.info("engine: %s ready in %.1fs (%d layers, routers: %s, max batch %d, %s, torch threads %d)",
                 self.model_name, time.monotonic() - t0, self.model.spec.n_layers,
                 "on" if self.has_routers else "off", s.max_batch_size, self.model.device, torch.get_num_threads())

    def _new_generator(self, planner: Planner) -> BatchGenerator:
        assert self.model is not None
        chunk = CHUNK_TOKENS.get(self.model.device.type, CHUNK_TOKENS["cuda"])
        return BatchGenerator(self.model, max_batch=self.settings.max_batch_size, planner=planner,
                              long_prompt=4 * chunk, chunk_tokens=chunk, scheduler=self.settings.scheduler,
                              max_wait_s=self.settings.max_queue_wait_s)

    def _loop(self) -> None:
        gen = self._gen
        assert gen is not None
        while not self._stopping:
            self._wake.clear()
            if not gen.has_work():
                self._wake.wait(0.5)
                continue
            try:
                outputs = gen.step()
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                log.exception("engine: step failed; failing %d sequences", gen.num_running + len(gen.waiting))
                gen.close()
                gen = self._reset(gen.planner, e)
                continue
            stats, deliveries = self._dispatch(outputs, gen)
            self._record(stats)  # before delivering, so a finished response is already counted in /metrics
            for handle, item in deliveries:
                handle.push(item)

    def _record(self, stats: StepStats) -> None:
        try:
            self.stats.on_step(stats)
        except Exception:  # noqa: BLE001 - metrics must never stop serving
            log.exception("engine: recording step stats failed")

    def _dispatch(self, outputs: list[SequenceOutput], gen: BatchGenerator
                  ) -> tuple[StepStats, list[tuple[RequestHandle, tuple[int, SequenceOutput]]]]:
        now = time.monotonic()
        stats = StepStats(running=gen.num_running, waiting=len(gen.waiting))
        deliveries: list[tuple[RequestHandle, tuple[int, SequenceOutput]]] = []
        with self._lock:
            for out in outputs:
                track = self._tracks.get(out.seq_id)
                if track is None:  # withdrawn at submission
                    continue
                if out.token_ids:
                    stats.generation_tokens += len(out.token_ids)
                    if track.last_token_t is not None:
                        stats.inter_token_s.append(now - track.last_token_t)
                    track.last_token_t = now
                if not track.admitted and track.seq.t_admit is not None:  # this step's prefill admitted it
                    track.admitted = True
                    stats.prompt_tokens += out.num_prompt_tokens
                if out.finished:
                    del self._tracks[out.seq_id]
                    stats.finished.append(_choice_stats(track.seq, out.finish_reason or "abort", now))
                deliveries.append((track.handle, (track.index, out)))
        return stats, deliveries

    def _reset(self, planner: Planner, error: Exception) -> BatchGenerator:
        """Fail every request in flight and continue with a fresh batch (and gauges that say so)."""
        fresh = self._new_generator(planner)
        with self._lock:
            tracks, self._tracks, self._gen = self._tracks, {}, fresh
        now = time.monotonic()
        self._record(StepStats(running=0, waiting=0,
                               finished=[_choice_stats(t.seq, "error", now) for t in tracks.values()]))
        failure = EngineFailure(f"{type(error).__name__} in the engine step")
        for handle in {id(t.handle): t.handle for t in tracks.values()}.values():
            handle.push(failure)
        return fresh


def _set_cpu_threads(n: int | None) -> None:
    """CPU inference: by default leave one core to the event loop. With every core busy in intra-op threads,
    HTTP handling and the OpenMP workers preempt each other and a decode step can take 10x longer."""
    if n == 0:
        return
    if n is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores - 1)
    torch.set_num_threads(n)


def _choice_stats(seq: Sequence, finish_reason: str, now: float) -> ChoiceStats:
    return ChoiceStats(
        finish_reason=finish_reason,
        plan=seq.plan,
        budget=seq.request.budget,
        e2e_s=now - seq.t_submit,
        queue_s=None if seq.t_admit is None else seq.t_admit - seq.t_submit,
        ttft_s=None if seq.t_first is None else seq.t_first - seq.t_submit,
    )

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

import torch

from routing.generation import BatchGenerator, GenerationRequest, Sequence, TokenEvent
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
    """The sequences of one HTTP request (one per prompt and choice) and the queue their events arrive on."""

    seqs: list[Sequence]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, TokenEvent] | BaseException] = field(default_factory=asyncio.Queue)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(choice index, event) until every sequence has finished; raises EngineFailure if the engine broke."""
        remaining = len(self.seqs)
        while remaining:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item[1].finished:
                remaining -= 1
            yield item

    def push(self, item: tuple[int, TokenEvent] | BaseException) -> None:
        """From the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


@dataclass
class _Track:
    handle: RequestHandle
    index: int
    admitted: bool = False
    last_token_t: float | None = None


class Engine:
    def __init__(self, settings: ServerSettings, model: BaseModel | None = None) -> None:
        self.settings = settings
        self.model = model  # given: used as is (tests); None: loaded by the engine thread
        self.stats: StatsSink = NullStats()
        self.on_failure: Callable[[BaseException], None] | None = None  # load failed (serve() exits)
        self.state = EngineState.LOADING
        self.error: BaseException | None = None
        self.has_routers = False
        self.torch_threads: int | None = None  # set when loaded
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

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for chat `messages` ({"role", "content"} dicts): the model's own chat template with
        the assistant's turn opened (transformers' `apply_chat_template`, add_generation_prompt=True). Raises
        RequestError when the model has no chat template or its template refuses the messages (400)."""
        tok = self.loaded.tokenizer
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
        """Queue the sequences of one HTTP request. Raises EngineNotReady, QueueFull or ValueError (bad request;
        nothing is queued then)."""
        self.require_ready()
        handle = RequestHandle([], asyncio.get_running_loop())
        with self._lock:
            gen = self._gen
            assert gen is not None
            if len(gen.waiting) + len(requests) > self.settings.max_queue:
                raise QueueFull(f"the server's queue is full ({self.settings.max_queue} waiting sequences); "
                                "retry later")
            try:
                for i, req in enumerate(requests):
                    seq = gen.submit(req)
                    handle.seqs.append(seq)
                    self._tracks[seq.seq_id] = _Track(handle, i)
            except ValueError:
                for seq in handle.seqs:  # withdraw the ones already queued, silently
                    self._tracks.pop(seq.seq_id, None)
                    gen.abort(seq)
                raise
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Cancel the handle's unfinished sequences (client gone); their rows free up at the next step."""
        with self._lock:  # only sequences still tracked live in the current batch
            pending = [s for s in handle.seqs if s.seq_id in self._tracks]
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
            self.model = load_model(s.model, device=s.device, dtype=s.dtype)
        if self.model.device.type == "cpu":
            _set_cpu_threads(s.torch_threads)
        self.torch_threads = torch.get_num_threads()
        planner, self.has_routers = make_planner(s.routers, self.model)
        self._gen = self._new_generator(planner)
        self._gen.submit(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=2, temperature=0)))
        self._gen.run_to_completion()  # warm-up, so the first request does not pay for lazy init
        self.stats.on_ready(self.model_name, self.model.spec.n_layers)
        self.state = EngineState.READY
        log.info("engine: %s ready in %.1fs (%d layers, routers: %s, max batch %d, %s, torch threads %d)",
                 self.model_name, time.monotonic() - t0, self.model.spec.n_layers,
                 "on" if self.has_routers else "off", s.max_batch_size, self.model.device, torch.get_num_threads())

    def _new_generator(self, planner: Planner) -> BatchGenerator:
        assert self.model is not None
        return BatchGenerator(self.model, max_batch=self.settings.max_batch_size, planner=planner)

    def _loop(self) -> None:
        gen = self._gen
        assert gen is not None
        while not self._stopping:
            self._wake.clear()
            if not gen.has_work():
                self._wake.wait(0.5)
                continue
            try:
                events = gen.step()
            except Exception as e:  # noqa: BLE001 - fail the batch's requests, keep serving
                log.exception("engine: step failed; failing %d sequences", len(gen.running) + len(gen.waiting))
                gen = self._reset(gen.planner, e)
                continue
            stats, deliveries = self._dispatch(events, gen)
            try:  # record before delivering, so a finished response is already counted in /metrics
                self.stats.on_step(stats)
            except Exception:  # noqa: BLE001 - metrics must never stop serving
                log.exception("engine: recording step stats failed")
            for handle, item in deliveries:
                handle.push(item)

    def _dispatch(self, events: list[TokenEvent], gen: BatchGenerator
                  ) -> tuple[StepStats, list[tuple[RequestHandle, tuple[int, TokenEvent]]]]:
        now = time.monotonic()
        stats = StepStats(running=len(gen.running), waiting=len(gen.waiting))
        deliveries: list[tuple[RequestHandle, tuple[int, TokenEvent]]] = []
        with self._lock:
            for ev in events:
                seq = ev.seq
                track = self._tracks.get(seq.seq_id)
                if track is None:  # withdrawn at submission
                    continue
                if ev.token_id is not None:
                    stats.generation_tokens += 1
                    if track.last_token_t is not None:
                        stats.inter_token_s.append(now - track.last_token_t)
                    track.last_token_t = now
                if not track.admitted and seq.t_admit is not None:  # this step's prefill admitted it
                    track.admitted = True
                    stats.prompt_tokens += len(seq.request.prompt_ids)
                if ev.finished:
                    del self._tracks[seq.seq_id]
                    stats.finished.append(_choice_stats(seq, now))
                deliveries.append((track.handle, (track.index, ev)))
        return stats, deliveries

    def _reset(self, planner: Planner, error: Exception) -> BatchGenerator:
        """Fail every request in flight and continue with a fresh batch."""
        fresh = self._new_generator(planner)
        with self._lock:
            tracks, self._tracks, self._gen = self._tracks, {}, fresh
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


def _choice_stats(seq: Sequence, now: float) -> ChoiceStats:
    return ChoiceStats(
        finish_reason=seq.finish_reason or "abort",
        plan=seq.plan,
        budget=seq.request.budget,
        e2e_s=now - seq.t_submit,
        queue_s=None if seq.t_admit is None else seq.t_admit - seq.t_submit,
        ttft_s=None if seq.t_first is None else seq.t_first - seq.t_submit,
    )

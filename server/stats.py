"""Plain stats the engine produces each step; `server.metrics` turns them into Prometheus series."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from routing.plan import LayerPlan


@dataclass
class ChoiceStats:
    """One finished sequence (one choice of one request)."""

    finish_reason: str  # stop | length | abort | error
    plan: LayerPlan | None  # None when aborted before its prefill
    budget: float | None
    e2e_s: float  # submit -> finish
    queue_s: float | None  # submit -> admission (None: never admitted)
    ttft_s: float | None  # submit -> first token (None: no token)


@dataclass
class StepStats:
    running: int  # rows in the batch after the step
    waiting: int  # sequences waiting for a row after the step
    prompt_tokens: int = 0  # prompt tokens prefilled in this step
    generation_tokens: int = 0  # tokens sampled in this step
    inter_token_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens of a row
    finished: list[ChoiceStats] = field(default_factory=list)


class StatsSink(Protocol):
    def on_ready(self, model_name: str, n_layers: int) -> None: ...

    def on_step(self, stats: StepStats) -> None: ...


class NullStats:
    def on_ready(self, model_name: str, n_layers: int) -> None:
        pass

    def on_step(self, stats: StepStats) -> None:
        pass

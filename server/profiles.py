"""Routing profiles: model names `<served-model-name>:<profile>` that choose routing for clients that can only
choose a model (lm-evaluation-harness's `local-completions`, framework wrappers without extra body fields).

`drllm serve --profile NAME=SPEC` (repeatable; SPEC is `full`, `auto` or `budget:B`). A request that sets
`routing`, `budget` or `plan` itself routes as it says; a profile only fills in for requests that say nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from routing.plan import budget_ok

from .errors import ModelNotFound
from .protocol import ModelCard, SamplingRequest

if TYPE_CHECKING:  # settings import this module, and the engine imports settings
    from .engine import Engine

R = TypeVar("R", bound=SamplingRequest)
DEFAULT_PROFILES = ("full=full", "eco=budget:0.8")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Profile:
    name: str
    routing: Literal["auto", "full"] = "auto"
    budget: float | None = None

    @classmethod
    def parse(cls, text: str) -> Profile:
        """`NAME=SPEC`, SPEC one of `full` (every block once), `auto` (the routers) or `budget:B` (the routers
        under budget B in (0, 2]). Raises ValueError with the accepted forms."""
        name, sep, spec = (x.strip() for x in text.partition("="))
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(f"profile {text!r}: expected NAME=SPEC with NAME of letters, digits, '.', '_', '-'")
        if spec in ("full", "auto"):
            return cls(name, spec)  # type: ignore[arg-type]
        kind, _, value = spec.partition(":")
        try:
            budget = float(value) if kind == "budget" else None
        except ValueError:
            budget = None
        if budget is None or not budget_ok(budget):
            raise ValueError(f"profile {text!r}: SPEC must be full, auto or budget:B with B in (0, 2]")
        return cls(name, "auto", budget)

    @property
    def spec(self) -> str:
        return self.routing if self.budget is None else f"budget:{self.budget:g}"

    def apply(self, request: R) -> R:
        """The request for the served model, routed by this profile unless it routes itself."""
        update: dict[str, object] = {"model": None}
        if not {"routing", "budget", "plan"} & request.model_fields_set:
            update |= {"routing": self.routing, "budget": self.budget}
        return request.model_copy(update=update)


class Profiles:
    """The profiles one server offers, by name, and the one place a request's `model` is resolved."""

    def __init__(self, engine: Engine, specs: list[str] | tuple[str, ...]) -> None:
        self.engine = engine
        self.by_name = {p.name: p for p in map(Profile.parse, specs)}

    def resolve(self, request: R) -> R:
        """`request` for the served model: unchanged for no model or the served name, routed by the profile for
        `<served>:<profile>`. Raises EngineNotReady while loading (the name is known once loaded) and
        ModelNotFound (404) for any other name."""
        self.engine.require_ready()
        served = self.engine.model_name
        if request.model in (None, served):
            return request
        base, _, name = (request.model or "").rpartition(":")
        if base == served and name in self.by_name:
            return self.by_name[name].apply(request)
        names = ", ".join(repr(n) for n in [served, *(f"{served}:{p}" for p in self.by_name)])
        raise ModelNotFound(f"the model {request.model!r} does not exist; this server serves {names}")

    def cards(self, base: ModelCard) -> list[ModelCard]:
        """/v1/models entries for the profiles, after the served model's own."""
        return [base.model_copy(update={"id": f"{base.id}:{p.name}", "parent": base.id, "routing_profile": p.spec})
                for p in self.by_name.values()]

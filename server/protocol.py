"""Request and response models of the OpenAI-compatible API (legacy Completions, models, errors), plus drllm's
extensions. `SamplingRequest` holds the fields Completions and Chat Completions (`chat_protocol.py`) share.

Extensions to OpenAI's request: `budget` (float in (0, 2]: most block executions as a fraction of L),
`routing` ("auto" | "full"), `plan` (a fixed per-layer plan of 0/1/2 counts, overriding routers and
budget; handy for tests and benchmarks), and vLLM's `top_k`, `min_p`, `min_tokens`, `repetition_penalty`,
`ignore_eos`. Responses add a `routing` object per choice.
"""

from __future__ import annotations

import logging
import time
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from routing.plan import MAX_BUDGET, LayerPlan
from routing.sampling import SamplingParams, choice_seed

from .errors import RequestError

log = logging.getLogger(__name__)
NEUTRAL_ZERO = {"minimum": 0, "maximum": 0}  # a number field accepted only at 0 (or null)

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# a string, a batch of strings, token ids, or a batch of token-id lists; nothing empty
Prompt = (NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] | TokenIds
          | Annotated[list[TokenIds], Field(min_length=1)])


def _kinds(tp: object) -> set[object]:
    """The plain types a field's annotation admits, through unions and Annotated (Any counts as Any)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _kinds(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(tp)))
    return {origin or tp}


def _has_bool(v: object) -> bool:
    return isinstance(v, bool) or (isinstance(v, list) and any(_has_bool(x) for x in v))


def _check_json_types(v: object, annotation: object) -> None:
    """JSON booleans only where a field is boolean, and only booleans there: pydantic's lax mode reads `true`
    as 1 (budget 1.0, n=1, token id 1, also inside token-id lists) and "yes", "on" or 1 as true. Raises
    ValueError naming what was expected."""
    kinds = _kinds(annotation)
    if Any in kinds or object in kinds:
        return
    if bool in kinds:
        if not isinstance(v, bool) and v is not None and kinds <= {bool, type(None)}:
            raise ValueError("expected true or false")
    elif _has_bool(v):
        raise ValueError("a boolean is not valid here" if isinstance(v, bool) else "a list here cannot hold booleans")


class OpenAIBaseModel(BaseModel):
    # Unknown fields are accepted and ignored (logged), as OpenAI-compatible servers do. Numbers must be
    # finite (NaN and infinities are 400s that say so), and JSON booleans stand only for boolean fields
    # (`_check_json_types`).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, v: object, info: ValidationInfo) -> object:
        field = cls.model_fields.get(info.field_name) if info.field_name is not None else None
        if field is not None:
            _check_json_types(v, field.annotation)
        return v

    @model_validator(mode="after")
    def _log_extra(self) -> OpenAIBaseModel:
        if self.model_extra:
            log.info("ignoring unknown request fields: %s", ", ".join(sorted(self.model_extra)))
        return self


# --- errors -------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
    status_code: int = Field(400, exclude=True)
    headers: dict[str, str] = Field(default_factory=dict, exclude=True)


# --- fields shared by Completions and Chat Completions ----------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class SamplingRequest(OpenAIBaseModel):
    """The fields both generation endpoints share: sampling, streaming, routing. Field constraints here are the
    API's documented limits (the OpenAPI schema shows them); a violation is a 400 naming the field."""

    model: str | None = None  # None: the served model; `<model>:<profile>` picks a routing profile
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=-1, le=2**63 - 1, description="-1: no seed (llama.cpp's convention)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields drllm does not implement: accepted only at their neutral values (the schema says which)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    presence_penalty: float | None = Field(None, json_schema_extra=NEUTRAL_ZERO)
    frequency_penalty: float | None = Field(None, json_schema_extra=NEUTRAL_ZERO)
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # above the vocabulary it keeps every token
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # drllm extensions
    budget: float | None = Field(None, gt=0, le=MAX_BUDGET)
    routing: Literal["auto", "full"] = "auto"
    plan: list[Annotated[int, Field(ge=0, le=2)]] | None = Field(
        None, min_length=1, description="per-layer counts, one per block: 0 skip, 1 execute, 2 repeat; at least one "
        "block must run", json_schema_extra={"contains": {"minimum": 1}})

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: object) -> object:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        return None if v == -1 else v

    @field_validator("logit_bias")
    @classmethod
    def _unsupported(cls, v: object, info: ValidationInfo) -> object:
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("this penalty is not supported; use repetition_penalty")
        return v

    @field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        try:
            LayerPlan(tuple(v))  # the counts rule lives there
        except ValueError as e:
            raise ValueError(f"plan must be a non-empty list of per-layer counts 0 (skip), 1 or 2 (repeat): {e}") \
                from None
        if not any(v):
            raise ValueError("plan must execute at least one block (all counts are 0)")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# --- completions --------------------------------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    # OpenAI fields drllm does not implement: accepted only at their neutral values
    best_of: int | None = Field(None, json_schema_extra={"minimum": 1, "maximum": 1})
    suffix: str | None = Field(None, json_schema_extra={"maxLength": 0})

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: object) -> object:
        # clear messages for what the union's constraints refuse (its own errors name a union member)
        items = v if isinstance(v, list) else [v]
        if v in ("", []) or any(p in ("", []) for p in items):
            raise ValueError("prompt must not be empty")
        ids = [t for p in items for t in (p if isinstance(p, list) else [p])]
        if any(isinstance(t, int) and t < 0 for t in ids):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("best_of other than 1 is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def to_sampling_params(self, defaults: dict[str, Any] | None = None, choice: int = 0) -> SamplingParams:
        """The user's value first, then the server's default, then OpenAI's default. `choice`: the index of
        the choice among `n` (its seed is `routing.sampling.choice_seed` of the request's)."""
        defaults = defaults or {}

        def pick(name: str, openai_default: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, openai_default)

        max_tokens = pick("max_tokens", 16)
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream=true", "stream_options")
        if self.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                               "min_tokens")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), seed=None if self.seed is None else choice_seed(self.seed, choice),
                stop=tuple(stop), min_tokens=self.min_tokens, repetition_penalty=pick("repetition_penalty", 1.0),
                logprobs=self.logprobs, ignore_eos=self.ignore_eos,
            )
        except ValueError as e:
            raise RequestError(str(e)) from e


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class RoutingInfo(BaseModel):
    layers_total: int
    layers_executed: int  # block executions per token (a repeat counts 2)
    layers_skipped: int
    layers_repeated: int
    plan: list[int]
    # the routers' per-layer probabilities over (skip, execute, repeat); only for router-planned choices
    decision_probs: list[list[float]] | None = Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    routing: RoutingInfo | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    routing: list[RoutingInfo | None] | None = None  # the usage chunk only: per choice, by index


class Health(BaseModel):
    status: Literal["ok"] = "ok"


# --- models -------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "drllm"
    root: str | None = None
    parent: str | None = Field(None, exclude_if=lambda v: v is None)  # a profile's served model
    routing_profile: str | None = Field(None, exclude_if=lambda v: v is None)  # full | auto | budget:B
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Request and response models of OpenAI's Chat Completions API, as vLLM implements it, plus drllm's extensions.

A chat request shares every sampling and routing field with Completions (`SamplingRequest`); it adds
`messages`, `max_completion_tokens` and the chat form of logprobs (`logprobs: bool` + `top_logprobs` 0-20).
`to_completion(prompt_ids)` turns it into the Completions request the one shared generation path runs.
Fields drllm does not implement (tools, JSON response formats, audio/image parts ...) are refused with a 400
that names them.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from .protocol import CompletionRequest, RoutingInfo, SamplingRequest, UsageInfo


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if v != "text":
            raise ValueError(f"content parts of type {v!r} are not supported; only 'text'")
        return v


class ChatMessage(BaseModel):
    """One message. `content` is a string or a list of text parts ({"type": "text", "text": ...})."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    # OpenAI message fields drllm does not implement: accepted only absent or empty
    tool_calls: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: dict[str, Any] | None = Field(None, json_schema_extra={"maxProperties": 0})
    audio: dict[str, Any] | None = Field(None, json_schema_extra={"maxProperties": 0})

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: object) -> object:
        for part in v if isinstance(v, list) else []:  # a clear message before the union's own errors
            if isinstance(part, dict) and part.get("type") != "text":
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported; only 'text'")
        return v

    @field_validator("tool_calls", "function_call", "audio")
    @classmethod
    def _unsupported(cls, v: object, info: ValidationInfo) -> object:
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(json_schema_extra={"enum": ["text"]})


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI; max_completion_tokens wins")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # OpenAI fields drllm does not implement: refused unless absent or at their neutral values
    tools: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict[str, Any] | None = Field(None, json_schema_extra={"enum": ["none", None]})
    functions: list[dict[str, Any]] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: str | dict[str, Any] | None = Field(None, json_schema_extra={"enum": ["", None]})
    response_format: ResponseFormat | None = None
    audio: dict[str, Any] | None = Field(None, json_schema_extra={"maxProperties": 0})
    modalities: list[Literal["text"]] | None = None
    prediction: dict[str, Any] | None = Field(None, json_schema_extra={"maxProperties": 0})

    @field_validator("tools", "functions", "function_call", "audio", "prediction")
    @classmethod
    def _unsupported_chat(cls, v: object, info: ValidationInfo) -> object:
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v is not None and v != "none":
            raise ValueError("tool_choice is not supported (tools are not)")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: ResponseFormat | None) -> ResponseFormat | None:
        if v is not None and v.type != "text":
            raise ValueError(f"response_format of type {v.type!r} is not supported; only 'text'")
        return v

    @field_validator("modalities", mode="before")
    @classmethod
    def _modalities(cls, v: object) -> object:
        if isinstance(v, list) and any(m != "text" for m in v):
            raise ValueError("only the 'text' modality is supported")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template reads them: role and plain-string content. OpenAI's `developer`
        role is the `system` role of older templates."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in self.messages]

    def to_completion(self, prompt_ids: list[int], max_context: int) -> CompletionRequest:
        """The Completions request that generates this chat's answer from its rendered prompt. Without a
        token limit the answer may fill the rest of the context (as vLLM). Fields were validated here already,
        so they are copied without re-validation (chat allows up to 20 top logprobs, Completions 5)."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        shared = {name: getattr(self, name) for name in SamplingRequest.model_fields}
        return CompletionRequest.model_construct(
            **shared, prompt=prompt_ids, echo=False,
            max_tokens=limit if limit is not None else max(max_context - len(prompt_ids), 0),
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


# --- responses ----------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # the token's UTF-8 bytes


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    routing: RoutingInfo | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    routing: RoutingInfo | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    routing: list[RoutingInfo | None] | None = None  # the usage chunk only: per choice, by index

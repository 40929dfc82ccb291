"""What /openapi.json says beyond what FastAPI derives from the routes: OpenAI's error envelope with the statuses
the server really returns (400 for every invalid request, never FastAPI's 422), the SSE stream of the
generation endpoints, and bearer authentication only when the server has an API key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .chat_protocol import ChatCompletionChunk
from .protocol import CompletionStreamResponse, ErrorResponse

STREAMS: dict[str, type[BaseModel]] = {"/v1/completions": CompletionStreamResponse,
                                       "/v1/chat/completions": ChatCompletionChunk}

_ERRORS = {
    400: "Invalid request: OpenAI's error envelope, `param` names the offending field",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model (neither the served model nor one of its routing profiles)",
    413: "The request body is larger than the server's `max_request_bytes`",
    429: "The queue is full; retry after `Retry-After` seconds",
    500: "The server failed while running the request (no internals are shown)",
    503: "The model is loading (or failed to load); retry after `Retry-After` seconds",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}},
    429: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    503: {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for error statuses, each with the error envelope and its headers."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s], **({"headers": _HEADERS[s]} if s in _HEADERS
                                                                       else {})} for s in statuses}


def sse(chunk: str) -> dict[int | str, dict[str, Any]]:
    """The 200 entry's second form: with `stream: true` the body is server-sent events."""
    return {200: {"description": f"The response (JSON), or with `stream: true` server-sent events: one `data: "
                                 f"<{chunk} JSON>` line per chunk (an error envelope if the stream fails), "
                                 "then `data: [DONE]`",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def finalize(schema: dict[str, Any], api_key: bool) -> dict[str, Any]:
    """Drop FastAPI's 422 (validation errors are 400s here) and, without an API key, the bearer scheme; state
    each SSE event (OpenAPI 3.1: the `schema` of text/event-stream is one event's, `data` its payload): a chunk
    as JSON, an error envelope, or the final `[DONE]`."""
    _, defs = models_json_schema([(m, "serialization") for m in (*STREAMS.values(), ErrorResponse)],
                                 ref_template="#/components/schemas/{model}")
    for name, definition in defs.get("$defs", {}).items():
        schema.setdefault("components", {}).setdefault("schemas", {}).setdefault(name, definition)
    for path, chunk in STREAMS.items():
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        json_data = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}}
        content["schema"] = {"type": "object", "required": ["data"], "properties": {"data": {
            "type": "string", "anyOf": [json_data, {"const": "[DONE]"}],
            "description": f"a {chunk.__name__} as JSON (an ErrorResponse if the stream fails), then `[DONE]`"}}}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if not api_key:
                op.pop("security", None)
                for status in ("401",):
                    op.get("responses", {}).pop(status, None)
    components = schema.get("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if not api_key:
        components.pop("securitySchemes", None)
    return schema

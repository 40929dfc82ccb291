"""Exceptions the server raises on purpose; `serving.create_error_response` maps each to a status."""

from __future__ import annotations


class RequestError(ValueError):
    """The request is invalid (400). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unauthorized(Exception):
    """Missing or wrong API key (401)."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve (404)."""


class PayloadTooLarge(Exception):
    """The request body is larger than the server's `max_request_bytes` (413)."""


class QueueFull(Exception):
    """Too many sequences are waiting for a batch row (429)."""

    retry_after_s = 1


class EngineNotReady(Exception):
    """The model is still loading, or failed to load (503)."""


class EngineFailure(Exception):
    """The engine thread hit an unexpected error while running a request (500)."""

"""OpenAI-style error bodies, and which status each failure gets.

Every error the endpoint returns has OpenAI's shape, so the ``openai`` client raises its usual
exception types (``BadRequestError``, ``NotFoundError``...) with our message::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

A request's own mistakes are 4xx and name the field; an engine that is gone is 503; only a bug is 500.
"""

from __future__ import annotations

from typing import Any

from skyrl_backends.errors import (
    ConfigError,
    EngineDeadError,
    EngineStateError,
    LoraAdapterError,
    UnsupportedCapabilityError,
    WeightUpdateError,
)


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error_from(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ConfigError):  # SamplingParamsError included: bad parameter values
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, (UnsupportedCapabilityError, LoraAdapterError, WeightUpdateError)):
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), type="service_unavailable_error", code="engine_unavailable")
    if isinstance(exc, EngineStateError):
        return APIError(503, str(exc), type="service_unavailable_error", code="engine_not_ready")
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")


def status_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"

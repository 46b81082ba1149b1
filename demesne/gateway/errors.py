"""The OpenAI error shape: every error a client can cause is an :class:`ApiError`, which the
error middleware turns into ``{"error": {"message", "type", "param", "code"}}`` with its status
(on Anthropic's paths, ``/v1/messages``, into Anthropic's ``{"type": "error", "error":
{"type", "message"}}``).
"""

from __future__ import annotations

from typing import Any


_ERROR_TYPES = {401: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status) or ("server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
}


def anthropic_body(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def body_for(path: str, error: ApiError) -> dict[str, Any]:
    """The error shape of the API that ``path`` belongs to."""
    return anthropic_body(error.status, error.message) if path.startswith("/v1/messages") else error.body()


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)

"""The one error type: an HTTP status, a machine-readable code and a message.

It is raised anywhere below the HTTP layer and rendered into the spec's envelope
`{"error":{"code","message","details"?}}` in exactly one place (http/responses.py).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        # Protocol headers some errors must carry (e.g. Stream-Closed on a 409).
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


def bad_request(message: str, code: str = "INVALID_REQUEST") -> ApiError:
    return ApiError(400, code, message)

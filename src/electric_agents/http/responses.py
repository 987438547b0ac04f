"""Raw ASGI response helpers, the headers every response carries, and the error envelope.

Headers are written as raw bytes: the stream protocol compares `Content-Type` exactly, so no
`; charset=` may be added behind our back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

from electric_agents.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
ALLOWED_HEADERS = ", ".join(
    [
        "content-type",
        "authorization",
        "if-none-match",
        "electric-claim-token",
        "electric-principal",
        "ngrok-skip-browser-warning",
        "Stream-Seq",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Closed",
        "Producer-Id",
        "Producer-Epoch",
        "Producer-Seq",
        "Stream-Forked-From",
        "Stream-Fork-Offset",
        "Stream-Fork-Sub-Offset",
    ]
)
EXPOSED_HEADERS = ", ".join(
    [
        "Stream-Next-Offset",
        "Stream-Cursor",
        "Stream-Up-To-Date",
        "Stream-Closed",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-SSE-Data-Encoding",
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "ETag",
        "Content-Type",
        "Content-Encoding",
        "Vary",
        "Location",
        "electric-handle",
        "electric-offset",
        "electric-schema",
        "electric-up-to-date",
        "electric-cursor",
    ]
)

COMMON_HEADERS: list[tuple[bytes, bytes]] = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", ALLOWED_METHODS.encode()),
    (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
    (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"cross-origin"),
]

JSON_CONTENT_TYPE = "application/json; charset=utf-8"


def encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def send_response(
    send: Send, status: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> None:
    raw = encode_headers(headers or {})
    raw.extend(COMMON_HEADERS)
    if status not in (204, 304):
        raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body if status not in (204, 304) else b""})


async def send_json(
    send: Send, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    merged = {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})}
    await send_response(send, status, merged, orjson.dumps(payload))


async def send_error(send: Send, error: ApiError) -> None:
    await send_response(send, error.status, *error_response(error))


def error_response(error: ApiError) -> tuple[dict[str, str], bytes]:
    """The headers and body of an error: the spec's JSON envelope."""
    headers = {"Content-Type": JSON_CONTENT_TYPE, **error.headers}
    return headers, orjson.dumps(error.envelope())


def header_map(raw_headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Request headers by lower-cased name (the first value of a repeated header wins)."""
    headers: dict[str, str] = {}
    for key, value in raw_headers:
        name = key.decode("latin-1").lower()
        if name not in headers:
            headers[name] = value.decode("latin-1")
    return headers


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; a 413 once it grows past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "CLIENT_DISCONNECTED", "Client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"Request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)

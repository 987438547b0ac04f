"""A small router for the JSON control plane under `/_electric/` (spec/02 §2.2).

Patterns use `:name` for one non-empty segment and `:name+` for the rest of the path; a
trailing slash on the request is ignored. Parameters are kept raw (still percent-encoded);
handlers decode the ones the spec says to decode.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import orjson

from electric_agents.agents.principals import Principal
from electric_agents.errors import ApiError
from electric_agents.http.responses import JSON_CONTENT_TYPE


@dataclass
class Request:
    method: str
    path: str  # raw, percent-encoded, without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    principal: Principal
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str) -> str:
        """A path parameter, percent-decoded."""
        return unquote(self.params[name])

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status, orjson.dumps(payload), {"Content-Type": JSON_CONTENT_TYPE, **(headers or {})}
    )


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str  # "*" matches any method
    pattern: str
    handler: Handler

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if self.method not in ("*", method):
            return None
        found = _compile(self.pattern).fullmatch(path)
        return found.groupdict() if found else None


_COMPILED: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _COMPILED.get(pattern)
    if compiled is None:
        parts = []
        for segment in pattern.strip("/").split("/"):
            if segment.startswith(":") and segment.endswith("+"):
                parts.append(f"(?P<{segment[1:-1]}>.+)")
            elif segment.startswith(":"):
                parts.append(f"(?P<{segment[1:]}>[^/]+)")
            else:
                parts.append(re.escape(segment))
        compiled = _COMPILED[pattern] = re.compile("/" + "/".join(parts))
    return compiled


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        trimmed = path.rstrip("/") or "/"
        for route in self.routes:
            params = route.match(method, trimmed)
            if params is not None:
                return route.handler, params
        return None


def parse_query(raw: bytes) -> dict[str, list[str]]:
    return parse_qs(raw.decode("latin-1"), keep_blank_values=True)


def not_found(message: str = "Not found") -> ApiError:
    return ApiError(404, "NOT_FOUND", message)

"""Dispatch policies (spec/02 §3.0, spec/03 §5.11): the strict `{targets:[target]}` shape, and
the loopback rewrite applied to handler URLs the server will call."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from electric_agents.agents.schemas import validation_errors

REWRITE_LOOPBACK_ENV = "ELECTRIC_AGENTS_REWRITE_LOOPBACK_WEBHOOKS_TO"

_NON_EMPTY_STRING = {"type": "string", "minLength": 1}

# Strict everywhere: exactly one target, no extra properties at any level.
DISPATCH_POLICY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "targets": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": "webhook"},
                            "url": _NON_EMPTY_STRING,
                            "subscription_id": _NON_EMPTY_STRING,
                        },
                        "required": ["type", "url"],
                        "additionalProperties": False,
                    },
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": "runner"},
                            "runnerId": _NON_EMPTY_STRING,
                            "subscription_id": _NON_EMPTY_STRING,
                        },
                        "required": ["type", "runnerId"],
                        "additionalProperties": False,
                    },
                ]
            },
        }
    },
    "required": ["targets"],
    "additionalProperties": False,
}


def dispatch_policy_problems(policy: Any) -> list[str]:
    """`[]` for a valid policy, else one `"<path> <message>"` line per failure."""
    return [
        f"{error['path']} {error['message']}"
        for error in validation_errors(DISPATCH_POLICY_SCHEMA, policy)
    ]


def webhook_policy(url: str) -> dict[str, Any]:
    """The default policy of a type registered with a serve endpoint."""
    return {"targets": [{"type": "webhook", "url": url}]}


_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def rewrite_loopback_url(url: str, rewrite_to: str | None) -> str:
    """Point a loopback handler URL somewhere else (spec/02 §1.3), e.g. from inside Docker to
    `host.docker.internal`. `rewrite_to` with `://` replaces scheme, userinfo, host and
    port; a bare `host[:port]` replaces the host and, when given, the port.

    Raises ValueError for a URL that cannot be parsed while a rewrite is configured."""
    if not rewrite_to:
        return url
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"Invalid URL: {url}")
    if parts.hostname not in _LOOPBACK_HOSTS:
        return url
    if "://" in rewrite_to:
        target = urlsplit(rewrite_to)
        return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, parts.fragment))
    userinfo = parts.netloc.rpartition("@")[0]
    host = rewrite_to
    if ":" not in rewrite_to.rsplit("]", 1)[-1] and parts.port is not None:
        host = f"{rewrite_to}:{parts.port}"
    netloc = f"{userinfo}@{host}" if userinfo else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

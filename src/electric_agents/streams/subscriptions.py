"""What a subscription of the `__ds` control API is (spec/01 §A.19): its configuration as
validated and normalized from a PUT body, its glob, its stream links and its outstanding wake,
and how each of them is written on the wire.

Paths here are relative to the stream root, without a leading slash (`events/abc`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from electric_agents.errors import ApiError, bad_request
from electric_agents.streams.offsets import format_offset

SubscriptionType = Literal["webhook", "pull-wake"]
SUBSCRIPTION_TYPES: tuple[SubscriptionType, ...] = ("webhook", "pull-wake")

DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 10 * 60_000
# An acknowledged offset before the first message: a stream linked when it was created.
BEFORE_FIRST = -1

MAX_ID_LENGTH = 256
MAX_PATH_LENGTH = 1024
MAX_URL_LENGTH = 2048
MAX_DESCRIPTION_LENGTH = 4096
MAX_STREAMS_PER_REQUEST = 1000

_DEV_LOOPBACK_RE = re.compile(r"^127\.0\.0\.(\d{1,3})$")


# Configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionConfig:
    """A validated, normalized PUT body. Two PUTs confirm each other iff their hashes match."""

    type: SubscriptionType
    pattern: str | None
    streams: tuple[str, ...]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    def config_hash(self) -> str:
        canonical = {
            "type": self.type,
            "pattern": self.pattern,
            "streams": sorted(set(self.streams)),
            "webhook": {"url": self.webhook_url} if self.webhook_url is not None else None,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }
        text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


def parse_subscription_config(payload: Any) -> SubscriptionConfig:
    """Validate a PUT body; every problem is a 400 with the envelope, never a 500."""
    if not isinstance(payload, dict):
        raise bad_request("Request body must be a JSON object")
    kind = payload.get("type")
    if kind not in SUBSCRIPTION_TYPES:
        raise bad_request('type must be "webhook" or "pull-wake"')

    pattern_raw = payload.get("pattern")
    if pattern_raw is not None and not isinstance(pattern_raw, str):
        raise bad_request("pattern must be a string")
    pattern = normalize_path(pattern_raw) if pattern_raw else None
    if pattern is not None:
        validate_pattern(pattern)

    streams_raw = payload.get("streams")
    streams = parse_stream_list(streams_raw, allow_empty=True) if streams_raw is not None else []
    if pattern is None and not streams:
        raise bad_request("At least one of pattern or streams is required")

    lease_ttl_ms = _parse_lease_ttl(payload.get("lease_ttl_ms"))

    webhook_url: str | None = None
    if kind == "webhook":
        webhook = payload.get("webhook")
        url = webhook.get("url") if isinstance(webhook, dict) else None
        if not isinstance(url, str) or not url:
            raise bad_request("webhook subscriptions require webhook.url")
        if len(url) > MAX_URL_LENGTH:
            raise bad_request("webhook.url is too long")
        check_webhook_url(url)
        webhook_url = url

    wake_raw = payload.get("wake_stream")
    if wake_raw is not None and not isinstance(wake_raw, str):
        raise bad_request("wake_stream must be a string")
    wake_stream = normalize_path(wake_raw) if wake_raw else None
    if wake_stream is not None:
        _check_path(wake_stream, "wake_stream")
    if kind == "pull-wake" and not wake_stream:
        raise bad_request("pull-wake subscriptions require wake_stream")

    description = payload.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request("description must be a string")
    if description is not None and len(description) > MAX_DESCRIPTION_LENGTH:
        raise bad_request("description is too long")

    return SubscriptionConfig(
        type=kind,
        pattern=pattern,
        streams=tuple(dict.fromkeys(streams)),
        webhook_url=webhook_url,
        wake_stream=wake_stream,
        lease_ttl_ms=lease_ttl_ms,
        description=description,
    )


def _parse_lease_ttl(raw: Any) -> int:
    if raw is None:
        return DEFAULT_LEASE_TTL_MS
    value = json_integer(raw)
    if value is None:
        raise bad_request("lease_ttl_ms must be an integer from 1000 to 600000")
    if not MIN_LEASE_TTL_MS <= value <= MAX_LEASE_TTL_MS:
        raise bad_request("lease_ttl_ms must be an integer from 1000 to 600000")
    return value


def json_integer(raw: Any) -> int | None:
    """JSON has one number type: 1000.0 is the integer 1000; a bool is not a number."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    return None


def parse_stream_list(raw: Any, *, allow_empty: bool) -> list[str]:
    """`streams` of a PUT or of `POST …/streams`: an array of non-empty path strings."""
    if not isinstance(raw, list) or (not raw and not allow_empty):
        raise bad_request("streams must be a non-empty array of strings")
    if len(raw) > MAX_STREAMS_PER_REQUEST:
        raise bad_request(f"streams may list at most {MAX_STREAMS_PER_REQUEST} paths")
    paths: list[str] = []
    for item in raw:
        path = normalize_path(item) if isinstance(item, str) else ""
        if not path:
            raise bad_request("streams must contain only non-empty path strings")
        _check_path(path, "streams")
        paths.append(path)
    return paths


def validate_subscription_id(raw: str) -> str:
    if not raw or len(raw) > MAX_ID_LENGTH or any(ord(c) < 0x20 or c == "\x7f" for c in raw):
        raise bad_request("Invalid subscription id")
    return raw


def normalize_path(path: str) -> str:
    return path.strip("/")


def _check_path(path: str, what: str) -> None:
    if len(path) > MAX_PATH_LENGTH or "//" in path:
        raise bad_request(f"{what} contains an invalid stream path")


# Globs -----------------------------------------------------------------------------------


def validate_pattern(pattern: str) -> None:
    """`*` and `**` are whole segments; a segment like `ab*` is not a glob we understand."""
    _check_path(pattern, "pattern")
    for segment in pattern.split("/"):
        if "*" in segment and segment not in ("*", "**"):
            raise bad_request("pattern wildcards must be whole segments: * or **")


def glob_match(pattern: str, path: str) -> bool:
    """`*` matches exactly one segment, `**` zero or more, anything else itself."""
    globs = pattern.split("/")
    segments = path.split("/")
    # matched[j]: the globs seen so far match the first j segments (dynamic programming, so
    # several `**` cost O(globs x segments), not exponential backtracking).
    matched = [True] + [False] * len(segments)
    for glob in globs:
        if glob == "**":
            for j in range(1, len(segments) + 1):
                matched[j] = matched[j] or matched[j - 1]
        else:
            for j in range(len(segments), 0, -1):
                matched[j] = matched[j - 1] and (glob == "*" or glob == segments[j - 1])
            matched[0] = False
    return matched[len(segments)]


def literal_prefix(pattern: str) -> str:
    """The segments before the first wildcard: every match is this path or below it."""
    literal: list[str] = []
    for segment in pattern.split("/"):
        if segment in ("*", "**"):
            break
        literal.append(segment)
    return "/".join(literal)


# Webhook URL policy ----------------------------------------------------------------------


def check_webhook_url(raw: str) -> None:
    """https to a public host; plain http only to localhost or 127.0.0.x for development.

    Hosts are checked as written (an IP literal in any notation the resolver accepts); names
    are not resolved here.
    """
    try:
        parts = urlsplit(raw)
        host = (parts.hostname or "").lower()
        _ = parts.port  # raises on a malformed port
    except ValueError:
        raise _rejected("webhook.url must be a valid URL") from None
    if parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in host):
        raise _rejected("webhook.url must be an http(s) URL with a host")
    if parts.scheme == "http":
        if host == "localhost" or _is_dev_loopback(host):
            return
        raise _rejected("http webhook URLs are only allowed for localhost or 127.0.0.x")
    if host == "localhost" or host.endswith(".localhost"):
        raise _rejected("localhost webhook URLs must use http for development")
    address = _ip_literal(host)
    if address is not None and (not address.is_global or address.is_multicast):
        raise _rejected("webhook.url must not target private, loopback or link-local hosts")


def _is_dev_loopback(host: str) -> bool:
    match = _DEV_LOOPBACK_RE.match(host)
    return match is not None and int(match.group(1)) <= 255


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # inet_aton also reads the forms a resolver accepts: 2130706433, 0x7f.1, 127.1.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _rejected(message: str) -> ApiError:
    return ApiError(400, "WEBHOOK_URL_REJECTED", message)


# Stored state ----------------------------------------------------------------------------


def render_offset(position: int) -> str:
    return "-1" if position < 0 else format_offset(position)


@dataclass(frozen=True)
class StreamLink:
    path: str
    link_type: Literal["explicit", "glob"]
    acked_offset: int

    def document(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "link_type": self.link_type,
            "acked_offset": render_offset(self.acked_offset),
        }


@dataclass(frozen=True)
class Wake:
    """The one outstanding wake of a subscription. It names one stream, up to `tail_offset`:
    an acknowledgement through this wake never goes past that stream and that offset."""

    wake_id: str
    generation: int
    state: str
    path: str
    link_type: str
    acked_offset: int
    tail_offset: int
    holder: str | None
    lease_expires_at: datetime | None
    # Judged by the database clock, the one clock all server processes share.
    lease_expired: bool

    def stream_document(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "link_type": self.link_type,
            "acked_offset": render_offset(self.acked_offset),
            "tail_offset": format_offset(self.tail_offset),
            "has_pending": self.tail_offset > self.acked_offset,
        }


@dataclass(frozen=True)
class Subscription:
    id: str
    type: SubscriptionType
    pattern: str | None
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None
    config_hash: str
    created_at: datetime
    status: str
    generation: int
    # Failed delivery attempts of the outstanding wake, for the retry backoff.
    attempts: int
    wake: Wake | None

    def document(self, links: list[StreamLink], signing: dict[str, str] | None) -> dict[str, Any]:
        """The GET/PUT response. Absent settings are left out, as JSON.stringify does; no
        secret is ever part of it."""
        body: dict[str, Any] = {
            "id": self.id,
            "subscription_id": self.id,
            "type": self.type,
            "pattern": self.pattern,
            "streams": [link.document() for link in links],
            "webhook": (
                {"url": self.webhook_url, "signing": signing}
                if self.webhook_url is not None
                else None
            ),
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "created_at": iso_timestamp(self.created_at),
            "status": self.status,
            "description": self.description,
        }
        return {key: value for key, value in body.items() if value is not None}


def iso_timestamp(moment: datetime) -> str:
    """`2024-01-02T03:04:05.678Z`, like JavaScript's Date.toISOString()."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"

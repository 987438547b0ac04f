"""The event-source catalog and the resolution of a subscription request against it
(spec/02 §3.2 `GET /_electric/event-sources`, §3.4; spec/03 §5.9). Pure: no I/O past
reading the catalog file at startup.

The catalog is configuration (`--event-sources FILE`): a JSON list of EventSourceContract
objects, checked once when the server starts. Resolution follows the runtime's
`resolveEventSourceSubscription` message for message, so its errors are the 400s the
reference returns.

Filters (`buckets[].filters[].condition`) use the reference's shape for `collections` and
`ops`; its `where` (a CEL expression) is not supported, and `match` (dotted paths into the
webhook row that must equal the given JSON values) is ours (docs/decisions.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from electric_agents.agents.schemas import check_schema, validation_errors
from electric_agents.errors import ApiError

WEBHOOK_EVENT_TYPE = "webhook_event"
WEBHOOK_WAKE: dict[str, Any] = {
    "on": "change",
    "collections": [WEBHOOK_EVENT_TYPE],
    "ops": ["insert"],
}
DEFAULT_LIFETIME: dict[str, Any] = {"kind": "until_entity_stopped"}

_ENDPOINT_KEY = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_BUCKET_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")
_TEMPLATE_PARAM = re.compile(r":([A-Za-z_][A-Za-z0-9_]*)")
_REQUIRED = re.compile(r"must have required property '(.+)'")

_STRING = {"type": "string"}
_FILTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string", "minLength": 1},
        "label": _STRING,
        "description": _STRING,
        "condition": {
            "type": "object",
            "properties": {
                "collections": {"type": "array", "items": _STRING},
                "ops": {"type": "array", "items": {"enum": ["insert", "update", "delete"]}},
                "match": {"type": "object"},
            },
            "not": {"required": ["where"]},
        },
    },
    "required": ["key", "label"],
}
CONTRACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "serviceId": _STRING,
        "sourceKey": {"type": "string", "minLength": 1},
        "sourceType": {"const": "webhook"},
        "endpointKey": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,62}$"},
        "status": {"enum": ["active", "disabled", "revoked"]},
        "label": _STRING,
        "description": _STRING,
        "agentVisible": {"type": "boolean"},
        "buckets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key": {"type": "string", "minLength": 1},
                    "label": _STRING,
                    "description": _STRING,
                    "pathTemplate": _STRING,
                    "paramsSchema": {"type": "object"},
                    "eventTypes": {"type": "array", "items": _STRING},
                    "filters": {"type": "array", "items": _FILTER_SCHEMA},
                },
                "required": ["key", "label", "pathTemplate", "paramsSchema"],
            },
        },
        "updatedAt": _STRING,
        "revision": {"type": "number"},
    },
    "required": [
        "sourceKey",
        "sourceType",
        "endpointKey",
        "status",
        "label",
        "agentVisible",
        "buckets",
        "revision",
    ],
}


class CatalogError(ValueError):
    """The catalog file is unusable (the server refuses to start)."""


class EventSourceCatalog:
    """The configured contracts, kept as the JSON they were given in."""

    def __init__(self, contracts: list[dict[str, Any]]) -> None:
        self.contracts = contracts
        self._by_key = {c["sourceKey"]: c for c in contracts}

    def visible(self) -> list[dict[str, Any]]:
        """`listEventSources` as the route shows it: agent-visible and active only."""
        return [c for c in self.contracts if c["agentVisible"] is True and c["status"] == "active"]

    def get(self, source_key: str) -> dict[str, Any] | None:
        return self._by_key.get(source_key)

    def filter_condition(
        self, source_key: Any, bucket_key: Any, filter_key: Any
    ) -> dict[str, Any] | None:
        """The condition of a bucket filter, or None (unknown, or no condition)."""
        contract = self._by_key.get(source_key) if isinstance(source_key, str) else None
        if contract is None or not filter_key:
            return None
        for bucket in contract["buckets"]:
            if bucket["key"] != bucket_key:
                continue
            for candidate in bucket.get("filters") or []:
                if candidate["key"] == filter_key:
                    return candidate.get("condition") or None
        return None


def load_catalog(path: str | Path) -> EventSourceCatalog:
    """Read and check the catalog file; any problem is one CatalogError line."""
    try:
        document = orjson.loads(Path(path).read_bytes())
    except OSError as error:
        raise CatalogError(f"cannot read event sources file {path}: {error.strerror}") from None
    except orjson.JSONDecodeError as error:
        raise CatalogError(f"event sources file {path} is not JSON: {error}") from None
    return parse_catalog(document, where=str(path))


def parse_catalog(document: Any, *, where: str = "event sources") -> EventSourceCatalog:
    if not isinstance(document, list):
        raise CatalogError(f"{where}: expected a JSON list of event source contracts")
    seen: set[str] = set()
    for index, contract in enumerate(document):
        errors = validation_errors(CONTRACT_SCHEMA, contract)
        if errors:
            first = errors[0]
            path = f"/{index}{first['path'].rstrip('/')}"
            message = first["message"]
            if "must NOT be valid" in message:
                message = "filter condition `where` (CEL) is not supported; use `match`"
            raise CatalogError(f"{where}: contract {path} {message}")
        if contract["sourceKey"] in seen:
            raise CatalogError(f'{where}: duplicate sourceKey "{contract["sourceKey"]}"')
        seen.add(contract["sourceKey"])
        for bucket in contract["buckets"]:
            try:
                check_schema(bucket["paramsSchema"], where="paramsSchema")
            except ApiError as error:
                detail = error.details[0] if isinstance(error.details, list) else None
                shown = f"{error.message}: {detail}" if detail else error.message
                raise CatalogError(
                    f'{where}: bucket "{bucket["key"]}" of "{contract["sourceKey"]}": {shown}'
                ) from None
    return EventSourceCatalog(document)


# --- resolution (the runtime's resolveEventSourceSubscription) ------------------------------


@dataclass(frozen=True)
class SubscriptionRequest:
    source_key: str
    bucket_key: str | None = None
    params: dict[str, Any] | None = None
    filter_key: str | None = None
    lifetime: dict[str, Any] | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ResolvedSubscription:
    subscription: dict[str, Any]  # the response's `subscription`, in wire key order
    manifest_entry: dict[str, Any]  # buildEventSourceManifestEntry
    filter_condition: dict[str, Any] | None  # the applied filter, if any
    expires_at: datetime | None  # `expires_at` lifetimes

    @property
    def source_url(self) -> str:
        return str(self.subscription["sourceUrl"])

    @property
    def manifest_key(self) -> str:
        return str(self.subscription["manifestKey"])


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def parse_expires_at(text: str) -> datetime:
    """`new Date(at)` must be a valid date (ISO 8601 here; no offset means UTC)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise invalid("Invalid expires_at lifetime timestamp") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def resolve_subscription(
    contract: Mapping[str, Any],
    entity_url: str,
    request: SubscriptionRequest,
    subscription_id: str | None,
    created_at: str,
) -> ResolvedSubscription:
    """Check the request against the contract and build the subscription and its manifest
    entry; a refusal is a 400 with the runtime's message (spec/03 §5.9 step 2)."""
    source_key = contract["sourceKey"]
    if contract["agentVisible"] is not True or contract["status"] != "active":
        raise invalid(f'Event source "{source_key}" is not active')
    if request.source_key != source_key:
        raise invalid(f"Event source key mismatch: expected {source_key}, got {request.source_key}")
    params = request.params if request.params is not None else {}
    bucket = None
    if request.bucket_key:
        bucket = next((b for b in contract["buckets"] if b["key"] == request.bucket_key), None)
        if bucket is None:
            raise invalid(f'Unknown bucket "{request.bucket_key}" for event source "{source_key}"')
    chosen_filter = None
    if request.filter_key:
        filters = (bucket or {}).get("filters") or []
        chosen_filter = next((f for f in filters if f["key"] == request.filter_key), None)
        if chosen_filter is None:
            raise invalid(f'Unknown filter "{request.filter_key}" for event source "{source_key}"')
    bucket_path = None
    if bucket is not None:
        _check_params(bucket, params)
        bucket_path = render_bucket_path(bucket, params)
    endpoint_key = contract["endpointKey"]
    source_url = webhook_stream_path(endpoint_key, bucket_path)
    if subscription_id is None:
        subscription_id = derive_subscription_id(
            request.source_key, request.bucket_key, params, request.filter_key
        )
    condition = (chosen_filter or {}).get("condition") or None
    lifetime = request.lifetime if request.lifetime is not None else dict(DEFAULT_LIFETIME)
    expires_at = None
    if lifetime.get("kind") == "expires_at":
        expires_at = parse_expires_at(str(lifetime.get("at", "")))
    manifest_key = f"event-source:{subscription_id}"
    subscription: dict[str, Any] = {"id": subscription_id, "entityUrl": entity_url}
    subscription["sourceKey"] = source_key
    if request.bucket_key:
        subscription["bucketKey"] = request.bucket_key
    subscription["params"] = params
    if request.filter_key:
        subscription["filterKey"] = request.filter_key
    subscription.update(
        filterApplied=condition is not None,
        contractRevision=contract["revision"],
        sourceUrl=source_url,
        sourceType=contract["sourceType"],
        manifestKey=manifest_key,
        lifetime=lifetime,
    )
    if request.reason:
        subscription["reason"] = request.reason
    subscription.update(createdBy="tool", createdAt=created_at)
    return ResolvedSubscription(
        subscription=subscription,
        manifest_entry=_manifest_entry(subscription, endpoint_key, bucket_path),
        filter_condition=condition,
        expires_at=expires_at,
    )


def _manifest_entry(
    subscription: dict[str, Any], endpoint_key: str, bucket_path: str | None
) -> dict[str, Any]:
    """buildEventSourceManifestEntry (spec/02 §8, event-source manifest value)."""
    event_source = {
        k: subscription[k]
        for k in (
            "id",
            "sourceKey",
            "bucketKey",
            "params",
            "filterKey",
            "filterApplied",
            "contractRevision",
            "lifetime",
            "reason",
            "createdBy",
            "createdAt",
        )
        if k in subscription
    }
    config: dict[str, Any] = {"endpointKey": endpoint_key, "streamUrl": subscription["sourceUrl"]}
    if bucket_path:
        config["bucket"] = bucket_path
    config["eventSource"] = event_source
    return {
        "key": subscription["manifestKey"],
        "kind": "source",
        "sourceType": "webhook",
        "sourceRef": f"{endpoint_key}/{bucket_path}" if bucket_path else endpoint_key,
        "config": config,
        "wake": dict(WEBHOOK_WAKE),
    }


def _check_params(bucket: Mapping[str, Any], params: Any) -> None:
    errors = validation_errors(bucket["paramsSchema"], params)
    if not errors:
        return
    parts = []
    for error in errors:
        path = error["path"]
        missing = _REQUIRED.fullmatch(error["message"])
        if path == "/" and missing:
            # Ajv's `instancePath || /<missingProperty>`.
            path = f"/{missing.group(1)}"
        parts.append(f"{path} {error['message']}")
    listed = "; ".join(parts)
    raise invalid(f'Bucket params do not match paramsSchema for "{bucket["key"]}": {listed}')


def render_bucket_path(bucket: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """renderEventSourceBucketPath: `:name` becomes the URL-encoded scalar param."""
    template = str(bucket["pathTemplate"])

    def substitute(found: re.Match[str]) -> str:
        name = found.group(1)
        if name not in params:
            raise invalid(f"Missing bucket parameter: {name}")
        return quote(_scalar_param(params[name], name), safe="-_.!~*'()")

    rendered = _TEMPLATE_PARAM.sub(substitute, template)
    if "//" in rendered or rendered.startswith("/"):
        raise invalid(f"Invalid bucket path template: {template}")
    if not rendered.strip():
        raise invalid("Bucket path template rendered an empty path")
    return rendered


def _scalar_param(value: Any, name: str) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = _js_number(value)
    else:
        raise invalid(f'Bucket parameter "{name}" must be a scalar value')
    if not text:
        raise invalid(f'Bucket parameter "{name}" must not be empty')
    return text


def _js_number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


def webhook_stream_path(endpoint_key: str, bucket: str | None = None) -> str:
    """getWebhookStreamPath: `/_webhooks/<endpointKey>[/<bucket>]`, both checked."""
    if not _ENDPOINT_KEY.fullmatch(endpoint_key):
        raise invalid("[agent-runtime] webhook endpointKey must be a URL-safe identifier")
    if not bucket:
        return f"/_webhooks/{endpoint_key}"
    trimmed = bucket.strip().strip("/")
    segments = trimmed.split("/")
    if not trimmed or any(
        s in ("", ".", "..") or not _BUCKET_SEGMENT.fullmatch(s) for s in segments
    ):
        raise invalid("[agent-runtime] webhook bucket must use non-empty URL-safe path segments")
    return f"/_webhooks/{endpoint_key}/{'/'.join(segments)}"


def derive_subscription_id(
    source_key: str, bucket_key: str | None, params: Any, filter_key: str | None
) -> str:
    """buildEventSourceSubscriptionId: `<normalized prefix>-<fnv1a32 base36 of stable JSON>`
    (only used when no id is given)."""
    prefix_parts = [source_key, bucket_key or "root", filter_key]
    prefix = re.sub(r"[^a-z0-9._-]+", "-", "-".join(p for p in prefix_parts if p).lower())
    prefix = prefix.strip("-")[:80] or "event-source"
    # The runtime hashes its whole input object, keys sorted, an absent one as `undefined`.
    identity = {
        "bucketKey": bucket_key,
        "filterKey": filter_key,
        "params": params,
        "sourceKey": source_key,
    }
    stable = ",".join(
        f"{_js_string(k)}:{'undefined' if v is None else _stable_json(v)}"
        for k, v in identity.items()
    )
    return f"{prefix}-{_base36(_fnv1a32('{' + stable + '}'))}"


def _stable_json(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_stable_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_js_string(k)}:{_stable_json(v)}" for k, v in items) + "}"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return _js_number(value)
    return orjson.dumps(value).decode()


def _js_string(text: str) -> str:
    return orjson.dumps(text).decode()


def _fnv1a32(text: str) -> int:
    # Over UTF-16 code units, as JavaScript's charCodeAt walks a string.
    data = text.encode("utf-16-le")
    value = 0x811C9DC5
    for index in range(0, len(data), 2):
        value ^= data[index] | data[index + 1] << 8
        value = (value * 0x01000193) & 0xFFFFFFFF
    return value


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


# --- filters --------------------------------------------------------------------------------


def filter_matches(condition: Mapping[str, Any], event: Mapping[str, Any], kind: str) -> bool:
    """Whether a webhook event passes a bucket filter's condition: its type among
    `collections`, its operation among `ops`, and every `match` path of its row (the
    event's `value`) equal to the given JSON value."""
    # Malformed parts (a condition stored through `POST /_electric/wake` carries whatever
    # the client sent) are ignored rather than failing the append that evaluates them.
    collections = condition.get("collections")
    if isinstance(collections, list) and collections and event.get("type") not in collections:
        return False
    ops = condition.get("ops")
    if isinstance(ops, list) and ops and kind not in ops:
        return False
    match = condition.get("match")
    if isinstance(match, dict):
        row = event.get("value")
        for path, expected in match.items():
            found, actual = _lookup(row, str(path))
            if not found or not _json_equal(actual, expected):
                return False
    return True


def _lookup(node: Any, path: str) -> tuple[bool, Any]:
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _json_equal(left: Any, right: Any) -> bool:
    """JSON equality: `true` is not `1`, `1` is `1.0`, objects ignore key order."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    return type(left) is type(right) and left == right

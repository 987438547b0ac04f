"""The change events the server itself writes into entity main streams (spec/02 §8, spec/03
§3.3, §3.5): `entity_created`, `inbox`, `identity` and `tags`.

Key order follows the reference, so the bytes match what its clients have seen.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import orjson

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# Inbox modes whose messages wait in the queue instead of being born processed.
PENDING_MODES = frozenset({"queued", "paused"})
JSON_CONTENT_TYPE = "application/json"


def iso_timestamp(epoch_ms: int) -> str:
    """JavaScript's `Date.prototype.toISOString()`: UTC, milliseconds, `Z`."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def iso_from_datetime(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def stream_path(stream_url: str) -> str:
    """The engine's path of a stream URL (`/chat/a1/main` -> `chat/a1/main`)."""
    return stream_url.lstrip("/")


def encode(*events: dict[str, Any]) -> bytes:
    """One append (or create) body: a JSON array, which the stream flattens into values."""
    return orjson.dumps(list(events))


def inbox_message_key(epoch_ms: int) -> str:
    suffix = "".join(secrets.choice(_BASE36) for _ in range(6))
    return f"msg-in-{epoch_ms}-{suffix}"


def entity_created(
    entity_type: str, epoch_ms: int, args: dict[str, Any] | None, parent: str | None
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "entity_type": entity_type,
        "timestamp": iso_timestamp(epoch_ms),
        "args": args if args is not None else {},
    }
    if parent is not None:
        value["parent_url"] = parent
    return {
        "type": "entity_created",
        "key": "entity-created",
        "value": value,
        "headers": {"operation": "insert"},
    }


def inbox_insert(
    *,
    key: str,
    sender: str,
    payload: Any,
    epoch_ms: int,
    mode: str | None,
    message_type: str | None,
    position: str | None,
) -> dict[str, Any]:
    """A sent message (spec/03 §3.5.2): immediate and steer messages are born processed;
    queued and paused ones wait, with a default position that sorts by time."""
    timestamp = iso_timestamp(epoch_ms)
    mode = mode or "immediate"
    pending = mode in PENDING_MODES
    value: dict[str, Any] = {
        "from": sender,
        "payload": payload,
        "timestamp": timestamp,
        "mode": mode,
        "status": "pending" if pending else "processed",
    }
    if message_type is not None:
        value["message_type"] = message_type
    if position is None and pending:
        position = f"{epoch_ms:016d}:a0"
    if position is not None:
        value["position"] = position
    if not pending:
        value["processed_at"] = timestamp
    return {"type": "inbox", "key": key, "value": value, "headers": {"operation": "insert"}}


def inbox_update(key: str, fields: dict[str, Any], epoch_ms: int) -> dict[str, Any]:
    """A partial update of a message: only the given fields, plus the time of a status
    change to processed or cancelled (the runtime merges updates into the row)."""
    value: dict[str, Any] = {}
    for name in ("payload", "position", "mode", "status"):
        if name in fields:
            value[name] = fields[name]
    if fields.get("status") == "processed":
        value["processed_at"] = iso_timestamp(epoch_ms)
    elif fields.get("status") == "cancelled":
        value["cancelled_at"] = iso_timestamp(epoch_ms)
    return {"type": "inbox", "key": key, "value": value, "headers": {"operation": "update"}}


def inbox_delete(key: str) -> dict[str, Any]:
    return {"type": "inbox", "key": key, "headers": {"operation": "delete"}}


def identity(value: Any) -> dict[str, Any]:
    """The principal's identity row. The reference writes it without `headers` (spec/03
    §3.5.3); clients that read it expect exactly that, so we do too."""
    return {"type": "identity", "key": "self", "value": value}


def tags_change(op: str, key: str, value: str | None, timestamp: str) -> dict[str, Any]:
    if op == "delete":
        return {"type": "tags", "key": key, "headers": {"timestamp": timestamp, "operation": op}}
    return {
        "type": "tags",
        "key": key,
        "value": {"key": key, "value": value},
        "headers": {"timestamp": timestamp, "operation": op},
    }

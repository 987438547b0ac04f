"""Wake conditions: does an appended event match a registration (spec/03 §4.4), and which
key identifies the event for idempotent delivery (§4.5). Pure functions, no I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from electric_agents.agents.event_source_catalog import filter_matches

RUN_FINISHED = "runFinished"
FINISHED_RUN_STATUSES = frozenset({"completed", "failed"})


@dataclass(frozen=True)
class Match:
    change: dict[str, Any]  # {"collection", "kind", "key"}
    run_finished_status: str | None = None


def match_condition(condition: Any, event: Any) -> Match | None:
    """The change an event makes for a registration's condition, or None."""
    if not isinstance(event, dict):
        return None
    headers = event.get("headers")
    operation = headers.get("operation") if isinstance(headers, dict) else None
    key = event.get("key")
    if condition == RUN_FINISHED:
        value = event.get("value")
        status = value.get("status") if isinstance(value, dict) else None
        if event.get("type") == "run" and operation == "update" and status in FINISHED_RUN_STATUSES:
            run_key = key if isinstance(key, str) and key else "run"
            return Match({"collection": "runs", "kind": "update", "key": run_key}, status)
        return None
    if not isinstance(condition, dict) or condition.get("on") != "change":
        return None
    event_type = event.get("type")
    if not isinstance(event_type, str) or not event_type:
        return None
    # `collections` names event types (`webhook_event`, `cron_tick`), not collections.
    collections = condition.get("collections") or []
    if collections and event_type not in collections:
        return None
    kind = operation if operation in ("delete", "update") else "insert"
    ops = condition.get("ops") or []
    if ops and kind not in ops:
        return None
    event_filter = condition.get("filter")
    if isinstance(event_filter, dict) and not filter_matches(event_filter, event, kind):
        return None  # an event-source subscription's bucket filter (spec/03 §5.9)
    change_key = key if isinstance(key, str) else ""
    return Match({"collection": event_type, "kind": kind, "key": change_key})


def source_event_key(event: dict[str, Any]) -> str:
    """`headers.offset`, else `<operation>:<key>`, else the key, else a random UUID (which
    no retry can repeat, so such events are not deduplicated)."""
    headers = event.get("headers")
    headers = headers if isinstance(headers, dict) else {}
    offset = headers.get("offset")
    if isinstance(offset, str) and offset:
        return offset
    operation = headers.get("operation")
    key = event.get("key")
    if isinstance(operation, str) and isinstance(key, str):
        return f"{operation}:{key}"
    if isinstance(key, str):
        return key
    return str(uuid.uuid4())


def any_match(conditions: list[Any], events: list[Any]) -> bool:
    return any(match_condition(c, e) is not None for c in conditions for e in events)

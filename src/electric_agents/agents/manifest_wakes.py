"""Wake registrations derived from `manifest` events a handler appends (spec/03 §3.6.1-3.6.3,
§4.12 first row): one registration per (owner, manifest key), replaced when the entry's
wake changes and removed when the entry is deleted or no longer asks for a wake.

Only the wake side effects live here, run in the manifest append's transaction. Cron
streams, `entities` sources and future sends are other side effects of the same events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import asyncpg

from electric_agents.agents.event_source_catalog import EventSourceCatalog, webhook_stream_path
from electric_agents.agents.wake_conditions import RUN_FINISHED
from electric_agents.agents.wake_registration_store import (
    WakeSpec,
    delete_by_manifest_key,
    upsert_registration,
)
from electric_agents.errors import ApiError

log = logging.getLogger(__name__)

_OPS = ("insert", "update", "delete")
_MAX_INT32 = 2**31 - 1


def has_manifest_events(events: list[Any]) -> bool:
    return any(isinstance(e, dict) and e.get("type") == "manifest" for e in events)


def manifest_events(events: Iterable[Any]) -> list[tuple[str, str | None, Any]]:
    """(key, operation, value) of each well-formed `manifest` event, in order."""
    found = []
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "manifest":
            continue
        key = event.get("key")
        if not isinstance(key, str) or not key:
            continue
        headers = event.get("headers")
        operation = headers.get("operation") if isinstance(headers, dict) else None
        found.append((key, operation, event.get("value")))
    return found


async def sync_manifest_wakes(
    conn: asyncpg.Connection,
    tenant: str,
    owner_url: str,
    events: list[Any],
    catalog: EventSourceCatalog | None = None,
) -> None:
    """For each manifest event in order: the entry's registration, or none (spec/03
    §3.6.3). An unchanged entry keeps its registration (and its timeout clock)."""
    for key, operation, value in manifest_events(events):
        spec = None
        if operation != "delete" and isinstance(value, dict):
            spec = manifest_wake_spec(owner_url, key, value, catalog)
        if spec is None:
            await delete_by_manifest_key(conn, tenant, owner_url, key)
            continue
        try:
            await upsert_registration(conn, tenant, spec)
        except ApiError as error:
            # The handler's append stands; only this entry's wake is refused.
            log.warning("manifest %s of %s: no wake: %s", key[:200], owner_url, error.message)


def manifest_wake_spec(
    owner_url: str, key: str, entry: dict[str, Any], catalog: EventSourceCatalog | None = None
) -> WakeSpec | None:
    """`buildManifestWakeRegistration` (spec/03 §3.6.2), or None when the entry asks for
    no wake or names no source this server can derive. An event-source entry with a
    `filterKey` gets its bucket filter from `catalog`, as its subscription route gave it."""
    source_url = _source_url(entry)
    wake = entry.get("wake")
    if source_url is None or wake is None:
        return None
    base = WakeSpec(
        subscriber_url=owner_url, source_url=source_url, condition=None, manifest_key=key
    )
    if wake == RUN_FINISHED:
        return replace(base, condition=RUN_FINISHED)
    if not isinstance(wake, dict):
        return None
    if wake.get("on") == RUN_FINISHED:
        include = wake.get("includeResponse")
        # Debounce and timeout are dropped for runFinished wakes.
        return replace(
            base,
            condition=RUN_FINISHED,
            include_response=include if isinstance(include, bool) else True,
        )
    if wake.get("on") != "change":
        return None
    condition: dict[str, Any] = {"on": "change"}
    collections = wake.get("collections")
    if isinstance(collections, list):
        condition["collections"] = [c for c in collections if isinstance(c, str)]
    ops = wake.get("ops")
    if isinstance(ops, list):
        condition["ops"] = [o for o in ops if o in _OPS]
    event_filter = _event_source_filter(entry, catalog)
    if event_filter is not None:
        condition["filter"] = event_filter
    return replace(
        base,
        condition=condition,
        debounce_ms=_milliseconds(wake.get("debounceMs")),
        timeout_ms=_milliseconds(wake.get("timeoutMs")),
    )


def _source_url(entry: dict[str, Any]) -> str | None:
    """The watched URL of a manifest entry (spec/03 §3.6.1), by kind."""
    kind = entry.get("kind")
    if kind in ("child", "observe"):
        return non_empty_string(entry.get("entity_url"))
    if kind == "shared-state":
        shared_id = non_empty_string(entry.get("id"))
        return f"/_electric/shared-state/{shared_id}" if shared_id else None
    if kind != "source":
        # `schedule` entries are registered by the schedule routes; effects and context
        # entries have no wake.
        return None
    config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    ref = non_empty_string(entry.get("sourceRef"))
    source_type = entry.get("sourceType")
    if source_type == "entity":
        return non_empty_string(config.get("entityUrl")) or ref
    if source_type == "cron":
        return f"/_cron/{ref}" if ref else None
    if source_type == "entities":
        return f"/_entities/{ref}" if ref else None
    if source_type == "db":
        shared_id = non_empty_string(config.get("id")) or ref
        return f"/_electric/shared-state/{shared_id}" if shared_id else None
    if source_type == "webhook":
        # `config.streamUrl`, else the path of `endpointKey` + `bucket` (0.4.9).
        stream_url = non_empty_string(config.get("streamUrl"))
        endpoint_key = non_empty_string(config.get("endpointKey"))
        if stream_url is not None or endpoint_key is None:
            return stream_url
        bucket = config.get("bucket")
        try:
            return webhook_stream_path(endpoint_key, bucket if isinstance(bucket, str) else None)
        except ApiError:
            return None  # not a valid webhook stream path: no wake
    return None


def _event_source_filter(
    entry: dict[str, Any], catalog: EventSourceCatalog | None
) -> dict[str, Any] | None:
    config = entry.get("config")
    event_source = config.get("eventSource") if isinstance(config, dict) else None
    if (
        catalog is None
        or entry.get("sourceType") != "webhook"
        or not isinstance(event_source, dict)
    ):
        return None
    return catalog.filter_condition(
        event_source.get("sourceKey"), event_source.get("bucketKey"), event_source.get("filterKey")
    )


def non_empty_string(value: Any) -> str | None:
    """A manifest field that must be a non-empty string, or None."""
    return value if isinstance(value, str) and value else None


def _milliseconds(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return min(max(0, int(value)), _MAX_INT32)

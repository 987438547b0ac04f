"""Rules for appends to entity streams (spec/02 §3.6 "POST *", spec/03 §3.4, §3.7): the
`AppendPolicy` the agents server hands to the stream app.

A POST to `<entity>/main` or `<entity>/error` of an existing entity needs the entity's live
claim write token, is refused once the entity is `stopped`, and each JSON event is checked
against the entity's effective state schemas. Any other path, including a `/main` whose
prefix is no entity, is a plain stream append with no checks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson

from electric_agents.agents.consumer_callback_store import has_consumer_callback
from electric_agents.agents.entity_store import Entity, get_entity
from electric_agents.agents.entity_type_store import get_entity_type
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedules import sync_manifest_schedules
from electric_agents.agents.schemas import validation_errors
from electric_agents.agents.signals import on_run_finished
from electric_agents.agents.write_tokens import check_write_token, claim_token_from_headers
from electric_agents.errors import ApiError

log = logging.getLogger(__name__)

_ENTITY_STREAM_SUFFIXES = ("/main", "/error")
_FINISHED_RUN_STATUSES = frozenset({"completed", "failed"})


def entity_url_of_stream(path: str) -> str | None:
    """`chat/a1/main` -> `/chat/a1`: the entity URL a stream path would belong to (it may
    belong to none), or None when the path is not shaped like an entity stream."""
    for suffix in _ENTITY_STREAM_SUFFIXES:
        if path.endswith(suffix):
            prefix = path[: -len(suffix)].strip("/")
            return "/" + prefix if prefix else None
    return None


class EntityStreamPolicy:
    """The agents server's `AppendPolicy` (http/streams_app.py)."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime

    async def check(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """Refuse an entity append before it is stored, in the order of spec/02 §3.6:
        401 without the live write token, 409 once stopped, 422 for an event its state
        schemas refuse."""
        entity_url = entity_url_of_stream(path)
        if entity_url is None:
            return
        tenant = self.runtime.tenant_id
        async with self.runtime.pool.acquire() as conn:
            entity = await get_entity(conn, tenant, entity_url)
            if entity is None:
                return
            token = claim_token_from_headers(headers)
            if not await check_write_token(conn, tenant, entity_url, token):
                raise ApiError(401, "UNAUTHORIZED", "Invalid write token")
            # Call point for the fork write lock (409 FORK_IN_PROGRESS) once forks exist.
            # Only `stopped` is checked: a killed entity's streams are closed, so the append
            # itself is refused with 409 STREAM_CLOSED. A `stopping` entity's handler may
            # still write until its wake ends (spec/03 §2.5).
            if entity.status == "stopped":
                raise ApiError(409, "NOT_RUNNING", "Entity is stopped")
            events = parse_events(body)
            if events is None:
                return
            schemas = await effective_state_schemas(conn, tenant, entity)
        if schemas is None:
            return
        for event in events:
            check_write_event(schemas, event)

    async def appended(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """After an entity append is stored (spec/03 §3.7 step 6). The response has already
        been sent, so failures are logged here rather than raised."""
        del headers
        entity_url = entity_url_of_stream(path)
        if entity_url is None:
            return
        events = parse_events(body)
        if events is None:
            return  # hooks run only for JSON bodies
        try:
            async with self.runtime.pool.acquire() as conn:
                entity = await get_entity(conn, self.runtime.tenant_id, entity_url)
                if entity is None:
                    return
                shortcut = first_finished_run(events) is not None and not (
                    await has_consumer_callback(conn, self.runtime.tenant_id, entity.main_stream)
                )
            await self.evaluate_wakes(entity, events)
            await self.sync_manifests(entity, events)
            if shortcut:
                # spec/03 §4.11: a handler that never used the claim protocol finished its
                # run; on_run_finished keeps `paused` and turns `stopping` into a full stop.
                await on_run_finished(self.runtime, entity_url)
        except (ApiError, asyncpg.PostgresError, OSError) as error:
            log.warning("after-append hooks for %s failed: %s", path, error)

    async def evaluate_wakes(self, entity: Entity, events: list[Any]) -> None:
        """Call point for the wake system (next issue): each event is a change on the entity
        URL as a wake source (spec/03 §3.7 step 6). Nothing evaluates wakes yet."""
        del entity, events

    async def sync_manifests(self, entity: Entity, events: list[Any]) -> None:
        """Call point for manifest side effects (spec/03 §3.6.3): wake registrations keyed by
        manifest key, cron streams, entity sources, future sends."""
        await sync_manifest_schedules(self.runtime, entity, events)


# --- event checks --------------------------------------------------------------------------


def parse_events(body: bytes) -> list[Any] | None:
    """The events of a JSON body (one value, or an array of them); None if not JSON."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, list) else [document]


async def effective_state_schemas(
    conn: asyncpg.Connection, tenant: str, entity: Entity
) -> dict[str, Any] | None:
    """The entity's snapshot of `state_schemas` shallow-merged with its type's current map,
    the type winning on a shared key (spec/03 §3.4 step 1). A type without a map leaves the
    snapshot as it is; None means no validation at all, while `{}` refuses every typed
    event."""
    entity_type = await get_entity_type(conn, tenant, entity.type)
    latest = entity_type.state_schemas if entity_type is not None else None
    if latest is None:
        return entity.state_schemas
    return {**(entity.state_schemas or {}), **latest}


def check_write_event(schemas: Mapping[str, Any], event: Any) -> None:
    """spec/03 §3.4 steps 3-5 for one event: 422 UNKNOWN_EVENT_TYPE or
    SCHEMA_VALIDATION_FAILED, else nothing."""
    if not isinstance(event, dict):
        return
    event_type = event.get("type")
    if not _js_truthy(event_type):
        return
    if not isinstance(event_type, str) or event_type not in schemas:
        # A non-string type never names a schema (the reference would coerce it to a key).
        shown = event_type if isinstance(event_type, str) else orjson.dumps(event_type).decode()
        raise ApiError(422, "UNKNOWN_EVENT_TYPE", f'Unknown event type "{shown}"')
    schema = schemas[event_type]
    if not _js_truthy(schema):
        return
    headers = event.get("headers")
    operation = headers.get("operation") if isinstance(headers, dict) else None
    if operation == "delete" and "old_value" in event:
        payload = event["old_value"]
    elif "value" in event:
        payload = event["value"]
    else:
        return
    if validation_errors(schema, payload):
        raise ApiError(422, "SCHEMA_VALIDATION_FAILED", "Validation failed")


def first_finished_run(events: list[Any]) -> dict[str, Any] | None:
    """The first `run` update whose status is completed or failed (spec/03 §4.11 step 1)."""
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "run":
            continue
        headers = event.get("headers")
        value = event.get("value")
        if (
            isinstance(headers, dict)
            and headers.get("operation") == "update"
            and isinstance(value, dict)
            and value.get("status") in _FINISHED_RUN_STATUSES
        ):
            return event
    return None


def _js_truthy(value: Any) -> bool:
    """JavaScript truthiness: objects and arrays are true even when empty."""
    if isinstance(value, dict | list):
        return True
    return bool(value)

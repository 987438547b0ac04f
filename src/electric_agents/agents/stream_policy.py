"""Rules for appends to entity streams (spec/02 §3.6 "POST *", spec/03 §3.4, §3.7): the
`AppendPolicy` the agents server hands to the stream app.

A POST to `<entity>/main` or `<entity>/error` of an existing entity needs the entity's live
claim write token, is refused once the entity is `stopped`, and each JSON event is checked
against the entity's effective state schemas. Any other path, including a `/main` whose
prefix is no entity, is a plain stream append with no checks.

Appends to wake sources (entity streams, shared state, webhook event streams) whose events
match a registration are committed in a transaction of their own together with the wakes
they cause (agents/wakes.py); all others keep group commit.
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
from electric_agents.agents.events import stream_path
from electric_agents.agents.manifest_wakes import has_manifest_events
from electric_agents.agents.manifests import sync_in_transaction
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedules import sync_manifest_schedules
from electric_agents.agents.schemas import validation_errors
from electric_agents.agents.signals import on_run_finished
from electric_agents.agents.wake_conditions import any_match
from electric_agents.agents.wake_registration_store import registrations_for_source
from electric_agents.agents.wakes import evaluate_wakes
from electric_agents.agents.write_tokens import check_write_token, claim_token_from_headers
from electric_agents.errors import ApiError
from electric_agents.streams.engine import InTransaction, StreamTransaction
from electric_agents.streams.writer import AppendResult

log = logging.getLogger(__name__)

_ENTITY_STREAM_SUFFIXES = ("/main", "/error")
# Non-entity streams whose appends are wake sources under their own path.
_WAKE_SOURCE_PREFIXES = ("_electric/shared-state/", "_webhooks/")
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

    async def check(self, path: str, headers: dict[str, str], body: bytes) -> InTransaction | None:
        """Refuse an entity append before it is stored, in the order of spec/02 §3.6:
        401 without the live write token, 409 once stopped, 422 for an event its state
        schemas refuse. Returns the wake evaluation to run in the append's transaction
        when some event may wake someone (spec/03 §4.3)."""
        entity_url = entity_url_of_stream(path)
        if entity_url is not None:
            async with self.runtime.pool.acquire() as conn:
                entity = await get_entity(conn, self.runtime.tenant_id, entity_url)
                if entity is not None:
                    events = await self._check_entity_append(conn, entity, headers, body)
                    return await self._wake_evaluation(conn, entity_url, events, manifests=True)
        if path.startswith(_WAKE_SOURCE_PREFIXES):
            # Shared state (spec/03 §5.6) and webhook event streams are watched by path.
            async with self.runtime.pool.acquire() as conn:
                return await self._wake_evaluation(conn, "/" + path, parse_events(body))
        return None

    async def _check_entity_append(
        self, conn: asyncpg.Connection, entity: Entity, headers: dict[str, str], body: bytes
    ) -> list[Any] | None:
        """The entity append checks; returns the body's events (None if not JSON)."""
        tenant = self.runtime.tenant_id
        token = claim_token_from_headers(headers)
        if not await check_write_token(conn, tenant, entity.url, token):
            raise ApiError(401, "UNAUTHORIZED", "Invalid write token")
        # Call point for the fork write lock (409 FORK_IN_PROGRESS) once forks exist.
        # Only `stopped` is checked: a killed entity's streams are closed, so the append
        # itself is refused with 409 STREAM_CLOSED. A `stopping` entity's handler may
        # still write until its wake ends (spec/03 §2.5).
        if entity.status == "stopped":
            raise ApiError(409, "NOT_RUNNING", "Entity is stopped")
        events = parse_events(body)
        if events is None:
            return None
        schemas = await effective_state_schemas(conn, tenant, entity)
        if schemas is not None:
            for event in events:
                check_write_event(schemas, event)
        return events

    async def _wake_evaluation(
        self,
        conn: asyncpg.Connection,
        source_url: str,
        events: list[Any] | None,
        *,
        manifests: bool = False,
    ) -> InTransaction | None:
        """Wake evaluation (and, for an entity's streams, the wake registrations of its
        `manifest` events) for the append's transaction, or None (group commit) when
        there is nothing to do. Most appends (text deltas under a runFinished watch) take
        the fast path this way."""
        if not events:
            return None
        tenant = self.runtime.tenant_id
        registrations = await registrations_for_source(conn, tenant, source_url)
        matching = [r for r in registrations if any_match([r.condition], events)]
        has_manifests = manifests and has_manifest_events(events)
        if not matching and not has_manifests:
            return None
        subscriber_streams = tuple(stream_path(f"{r.subscriber_url}/main") for r in matching)

        async def evaluate(tx: StreamTransaction, result: AppendResult) -> None:
            # A producer duplicate (204 with producer headers) appended nothing new.
            if result.status == 200 or "Producer-Epoch" not in result.headers:
                await evaluate_wakes(tx, tenant, source_url, events)
                if has_manifests:
                    await sync_in_transaction(
                        tx.conn, tenant, source_url, events, self.runtime.settings.event_sources
                    )

        return InTransaction(evaluate, also_appends_to=subscriber_streams)

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
            # Wakes were evaluated in the append's transaction (see check).
            await self.sync_manifests(entity, events)
            if shortcut:
                # spec/03 §4.11: a handler that never used the claim protocol finished its
                # run; on_run_finished keeps `paused` and turns `stopping` into a full stop.
                await on_run_finished(self.runtime, entity_url)
        except (ApiError, asyncpg.PostgresError, OSError) as error:
            log.warning("after-append hooks for %s failed: %s", path, error)

    async def sync_manifests(self, entity: Entity, events: list[Any]) -> None:
        """The manifest side effects that run after the append (spec/03 §3.6.3): future
        sends and cron streams. (Wake registrations keyed by manifest key are synced in the
        append's transaction, agents/manifest_wakes.py.)"""
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

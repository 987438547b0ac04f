"""Sends and inbox edits (spec/02 §3.4, spec/03 §3.5.2, §5.3, §5.8).

A send locks the entity row, checks it (status, inbox schemas, sender rights), resumes a
paused entity and appends the `inbox` event, all in one transaction: a signal racing the send
either comes before it (and the send is refused) or after it. Delayed sends (`afterMs`) are
checked the same way and stored as a `scheduled_tasks` row for the scheduler to deliver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from electric_agents.agents import events
from electric_agents.agents.dispatch_links import link_dispatch
from electric_agents.agents.entity_store import (
    Entity,
    get_entity,
    now_ms,
    set_dispatch_policy,
    set_status,
)
from electric_agents.agents.entity_streams import append_to_main
from electric_agents.agents.entity_type_store import EntityType, get_entity_type
from electric_agents.agents.principal_entities import UPDATE_IDENTITY, ensure_principal_entity
from electric_agents.agents.principals import Principal
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schemas import validation_errors
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction

# spec/03 §2.1 rejectsNormalWrites: a stopping entity finishes its run but takes no input.
REJECTS_WRITES = frozenset({"stopping", "stopped", "killed"})
# A delay beyond this would overflow the database's timestamps; nobody means it.
MAX_AFTER_MS = 100 * 365 * 24 * 3600 * 1000


@dataclass(frozen=True)
class SendRequest:
    """A message for an entity's inbox. `has_payload` tells an absent `payload` from a
    JSON `null` one (only absence is an error)."""

    payload: Any = None
    has_payload: bool = False
    key: str | None = None
    message_type: str | None = None
    mode: str | None = None
    position: str | None = None
    after_ms: float | None = None
    claimed_from: str | None = None  # the request's `from`, which must name the caller


class Sender(Protocol):
    """Who a message is from: a principal, or (for a future send a handler put in its
    manifest) the URL the entry names."""

    @property
    def url(self) -> str: ...

    @property
    def is_system(self) -> bool: ...


def not_running() -> ApiError:
    return ApiError(409, "NOT_RUNNING", "Entity is not accepting writes")


def entity_not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Entity not found")


def effective_inbox_schemas(
    entity: Entity, entity_type: EntityType | None
) -> dict[str, Any] | None:
    """The entity's snapshot with the type's current map over it (the type wins). `{}` is
    a map like any other: present, and rejecting every typed send (spec/02 §7.4)."""
    current = entity_type.inbox_schemas if entity_type is not None else None
    if entity.inbox_schemas is None and current is None:
        return None
    return {**(entity.inbox_schemas or {}), **(current or {})}


def check_send(
    entity: Entity, entity_type: EntityType | None, request: SendRequest, sender: Sender
) -> None:
    """validateSendRequest (spec/03 §5.3), in the reference's order."""
    if entity.status in REJECTS_WRITES:
        raise not_running()
    schemas = effective_inbox_schemas(entity, entity_type)
    if request.message_type is not None and schemas is not None:
        if request.message_type not in schemas:
            raise ApiError(
                422, "UNKNOWN_MESSAGE_TYPE", f'Unknown message type "{request.message_type}"'
            )
        schema = schemas[request.message_type]
        if schema is not None:
            errors = validation_errors(schema, request.payload)
            if errors:
                raise ApiError(422, "SCHEMA_VALIDATION_FAILED", "Validation failed", details=errors)
    if (
        entity.type == "principal"
        and request.message_type == UPDATE_IDENTITY
        and not sender.is_system
    ):
        raise ApiError(
            403, "UNAUTHORIZED", "Only built-in system principals can update principal identity"
        )
    if not request.has_payload:
        raise ApiError(400, "INVALID_REQUEST", "Missing required field: payload")


async def send(
    runtime: AgentsRuntime, sender: Principal, entity_url: str, request: SendRequest
) -> None:
    """POST …/send: deliver now, or store a delayed send when `afterMs > 0`."""
    if request.claimed_from is not None and request.claimed_from != sender.url:
        raise ApiError(400, "INVALID_REQUEST", "Request from must match Electric-Principal")
    if request.after_ms is not None and request.after_ms > MAX_AFTER_MS:
        raise ApiError(400, "INVALID_REQUEST", "afterMs is too large")
    await ensure_principal_entity(runtime, sender)
    async with runtime.engine.transaction() as tx:
        await send_in(tx, runtime, sender, entity_url, request)


async def send_in(
    tx: StreamTransaction,
    runtime: AgentsRuntime,
    sender: Sender,
    entity_url: str,
    request: SendRequest,
) -> None:
    """A send inside the caller's transaction: `send`, and the scheduler delivering a
    delayed send in the transaction that completes its task."""
    tenant = runtime.tenant_id
    entity = await get_entity(tx.conn, tenant, entity_url, for_update=True)
    if entity is None:
        raise entity_not_found()
    entity_type = await get_entity_type(tx.conn, tenant, entity.type)
    await _backfill_dispatch_policy(tx, tenant, entity, entity_type)
    if entity.status not in REJECTS_WRITES:
        # Before the append, in its transaction: the send commits with the link that
        # wakes its handler (spec/02 §3.4 side effect C).
        await link_dispatch(
            tx.conn, tenant, entity, on_subscription_created=runtime.on_subscription_created
        )
    if request.after_ms is not None and request.after_ms > 0:
        check_send(entity, entity_type, request, sender)
        await _schedule_delayed_send(tx, tenant, entity, request, sender, request.after_ms)
        return
    await deliver(tx, tenant, entity, entity_type, request, sender)


async def deliver(
    tx: StreamTransaction,
    tenant: str,
    entity: Entity,
    entity_type: EntityType | None,
    request: SendRequest,
    sender: Sender,
) -> None:
    """Check and append one message inside the caller's transaction; the entity row must be
    locked (or created) by it. Used by `send` and by spawn's `initialMessage`."""
    check_send(entity, entity_type, request, sender)
    now = now_ms()
    if entity.status == "paused" and request.mode != "paused":
        # A new message resumes a SIGSTOPped entity (spec/03 §2.3 T13), atomically with it.
        await set_status(tx.conn, tenant, entity.url, "idle")
        entity.status = "idle"
    message = events.inbox_insert(
        key=request.key if request.key is not None else events.inbox_message_key(now),
        sender=sender.url,
        payload=request.payload,
        epoch_ms=now,
        mode=request.mode,
        message_type=request.message_type,
        position=request.position,
    )
    written = [message]
    if entity.type == "principal" and request.message_type == UPDATE_IDENTITY:
        identity = request.payload.get("identity") if isinstance(request.payload, dict) else None
        written.append(events.identity(identity))
    await append_to_main(tx, entity, *written)


async def _backfill_dispatch_policy(
    tx: StreamTransaction, tenant: str, entity: Entity, entity_type: EntityType | None
) -> None:
    """An entity without a policy takes its type's default on send, and keeps it
    (spec/03 §5.3; reference quirk 20, kept because clients see it in the row)."""
    if entity.dispatch_policy is not None or entity_type is None:
        return
    default = entity_type.default_dispatch_policy
    if default is None:
        return
    entity.updated_at = await set_dispatch_policy(tx.conn, tenant, entity.url, default)
    entity.dispatch_policy = default


async def _schedule_delayed_send(
    tx: StreamTransaction,
    tenant: str,
    entity: Entity,
    request: SendRequest,
    sender: Sender,
    after_ms: float,
) -> None:
    """A `delayed_send` task (spec/03 §5.8) for the scheduler; its payload names what
    the send carried, `null`-free like the reference's JSON."""
    payload: dict[str, Any] = {"entityUrl": entity.url, "from": sender.url}
    if request.has_payload:
        payload["payload"] = request.payload
    for name, value in (
        ("key", request.key),
        ("type", request.message_type),
        ("mode", request.mode),
        ("position", request.position),
    ):
        if value is not None:
            payload[name] = value
    await tx.conn.execute(
        """
        INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at)
        VALUES ($1, 'delayed_send', $2::jsonb,
                clock_timestamp() + make_interval(secs => $3::float8 / 1000))
        """,
        tenant,
        orjson.dumps(payload).decode(),
        after_ms,
    )


async def update_inbox_message(
    runtime: AgentsRuntime, entity_url: str, message_key: str, fields: dict[str, Any]
) -> None:
    """PATCH …/inbox/:key: a partial update event with only the given fields. The key is
    not checked for existence (the reference does not either)."""
    async with runtime.engine.transaction() as tx:
        entity = await _writable_entity(tx, runtime.tenant_id, entity_url)
        if not fields:
            raise ApiError(400, "INVALID_REQUEST", "No inbox fields to update")
        await append_to_main(tx, entity, events.inbox_update(message_key, fields, now_ms()))


async def delete_inbox_message(runtime: AgentsRuntime, entity_url: str, message_key: str) -> None:
    async with runtime.engine.transaction() as tx:
        entity = await _writable_entity(tx, runtime.tenant_id, entity_url)
        await append_to_main(tx, entity, events.inbox_delete(message_key))


async def _writable_entity(tx: StreamTransaction, tenant: str, entity_url: str) -> Entity:
    entity = await get_entity(tx.conn, tenant, entity_url, for_update=True)
    if entity is None:
        raise entity_not_found()
    if entity.status in REJECTS_WRITES:
        raise not_running()
    return entity

"""Entities: addressing, lookup, listing and spawn (spec/02 §3.4, spec/03 §5.2).

Spawn is one transaction: the row, both streams with `entity_created`, the optional
`initialMessage` and the optional spawn-time wake registration commit together or not at all
(the reference wrote them in sequence and could leave any prefix behind, spec/03 §6.5).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import asyncpg

from electric_agents.agents import events
from electric_agents.agents.dispatch_links import link_dispatch
from electric_agents.agents.entity_store import (
    Entity,
    current_txid,
    get_entity,
    list_entities,
    now_ms,
)
from electric_agents.agents.entity_streams import create_entity_with_streams, duplicate_url
from electric_agents.agents.entity_type_store import EntityType, get_entity_type
from electric_agents.agents.entity_types import PRINCIPAL_TYPE_NAME
from electric_agents.agents.inbox import SendRequest, deliver
from electric_agents.agents.principal_entities import ensure_principal_entity
from electric_agents.agents.principals import Principal, parse_principal_key
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schemas import validation_errors
from electric_agents.agents.wake_registration_store import WakeSpec, upsert_registration
from electric_agents.errors import ApiError


@dataclass(frozen=True)
class WakeRegistration:
    """The spawn body's `wake`: wake `subscriber_url` on changes of the new entity."""

    subscriber_url: str
    condition: Any  # "runFinished" or {"on": "change", "collections"?, "ops"?}
    debounce_ms: int = 0
    timeout_ms: int = 0
    include_response: bool = True
    manifest_key: str | None = None


@dataclass(frozen=True)
class InitialMessage:
    payload: Any
    message_type: str | None = None


@dataclass(frozen=True)
class SpawnRequest:
    args: dict[str, Any] | None = None
    tags: dict[str, str] | None = None
    parent: str | None = None
    dispatch_policy: dict[str, Any] | None = None
    initial_message: InitialMessage | None = None
    wake: WakeRegistration | None = None


@dataclass(frozen=True)
class SpawnResult:
    entity: Entity
    txid: int


@dataclass(frozen=True)
class EntityFilters:
    type: str | None = None
    status: str | None = None
    parent: str | None = None
    created_by: str | None = None


# --- addressing (spec/02 §3.4 middleware A) -----------------------------------------------


def entity_url(type_segment: str, instance_segment: str) -> str | None:
    """The entity URL named by two raw (still percent-encoded) path segments, or None when
    they cannot name one (empty, a reserved `_` type, a `*`, a malformed principal key)."""
    if not type_segment or not instance_segment:
        return None
    if type_segment.startswith("_") or "*" in type_segment or "*" in instance_segment:
        return None
    if type_segment == PRINCIPAL_TYPE_NAME:
        principal = parse_principal_key(unquote(instance_segment))
        return principal.url if principal is not None else None
    return f"/{type_segment}/{instance_segment}"


async def require_entity(
    runtime: AgentsRuntime, type_segment: str, instance_segment: str
) -> Entity:
    """The existing entity a `/:type/:instanceId…` route addresses (middleware A): a
    principal's entity is created on first mention; otherwise 404 NOT_FOUND when the type
    exists and 404 UNKNOWN_ENTITY_TYPE when it does not.

    The reference answers 500 for segments that cannot name an entity (spec/02 §9.1); here
    that is a 400 for a malformed principal key and a 404 otherwise (no such entity can
    exist), as the signal routes answer."""
    url = entity_url(type_segment, instance_segment)
    if url is None:
        if type_segment == PRINCIPAL_TYPE_NAME:
            raise ApiError(400, "INVALID_REQUEST", "Invalid principal key")
        raise ApiError(404, "NOT_FOUND", "Entity not found")
    tenant = runtime.tenant_id
    async with runtime.pool.acquire() as conn:
        entity = await get_entity(conn, tenant, url)
        if entity is not None:
            return entity
        if type_segment != PRINCIPAL_TYPE_NAME:
            if await get_entity_type(conn, tenant, type_segment) is not None:
                raise ApiError(404, "NOT_FOUND", f"Entity not found at {url}")
            raise unknown_entity_type(type_segment)
    principal = parse_principal_key(unquote(instance_segment))
    assert principal is not None  # entity_url parsed it
    return await ensure_principal_entity(runtime, principal)


def unknown_entity_type(name: str) -> ApiError:
    return ApiError(404, "UNKNOWN_ENTITY_TYPE", f'Entity type "{name}" not found')


async def list_matching(runtime: AgentsRuntime, filters: EntityFilters) -> list[Entity]:
    async with runtime.pool.acquire() as conn:
        return await list_entities(
            conn,
            runtime.tenant_id,
            type_name=filters.type,
            status=filters.status,
            parent=filters.parent,
            created_by=filters.created_by,
        )


# --- spawn ----------------------------------------------------------------------------------


async def check_spawnable(runtime: AgentsRuntime, type_segment: str, instance_segment: str) -> None:
    """What spawn checks before it reads the body: not a principal, an addressable URL, a
    registered type."""
    if type_segment == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            "Principal entities are built in and cannot be spawned directly",
        )
    if type_segment.startswith("_"):
        raise ApiError(400, "INVALID_REQUEST", 'Entity type names starting with "_" are reserved')
    if entity_url(type_segment, instance_segment) is None:
        raise ApiError(400, "INVALID_REQUEST", 'Entity URLs must not contain "*"')
    async with runtime.pool.acquire() as conn:
        if await get_entity_type(conn, runtime.tenant_id, type_segment) is None:
            raise unknown_entity_type(type_segment)


async def spawn(
    runtime: AgentsRuntime,
    creator: Principal,
    type_segment: str,
    instance_segment: str,
    request: SpawnRequest,
) -> SpawnResult:
    """PUT /_electric/entities/:type/:instanceId, checks in the order of spec/02 §3.4.
    The caller ran `check_spawnable`."""
    url = entity_url(type_segment, instance_segment)
    assert url is not None
    await ensure_principal_entity(runtime, creator)
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        conn = tx.conn
        entity_type = await get_entity_type(conn, tenant, type_segment)
        if entity_type is None:
            raise unknown_entity_type(type_segment)
        parent = await get_entity(conn, tenant, request.parent) if request.parent else None
        policy = spawn_dispatch_policy(request.dispatch_policy, parent, entity_type)
        await check_runner_targets(conn, tenant, policy, creator)
        if request.args is not None and entity_type.creation_schema is not None:
            errors = validation_errors(entity_type.creation_schema, request.args)
            if errors:
                raise ApiError(422, "SCHEMA_VALIDATION_FAILED", "Validation failed", details=errors)
        if await get_entity(conn, tenant, url) is not None:
            raise duplicate_url(url)
        if request.parent is not None and parent is None:
            raise ApiError(404, "NOT_FOUND", f'Parent entity "{request.parent}" not found')
        now = now_ms()
        entity = Entity(
            url=url,
            type=entity_type.name,
            subscription_id=f"{entity_type.name}-handler",
            dispatch_policy=policy,
            write_token=str(uuid.uuid4()),
            tags=dict(request.tags or {}),
            spawn_args=request.args if request.args is not None else {},
            parent=request.parent,
            created_by=creator.url,
            type_revision=entity_type.revision,
            inbox_schemas=entity_type.inbox_schemas,
            state_schemas=entity_type.state_schemas,
            created_at=now,
            updated_at=now,
        )
        created = events.entity_created(entity_type.name, now, request.args, request.parent)
        await create_entity_with_streams(tx, tenant, entity, [created])
        # Linked at the tail (after `entity_created`), before the initial message.
        await link_dispatch(
            conn, tenant, entity, on_subscription_created=runtime.on_subscription_created
        )
        if request.wake is not None:
            await _register_wake(conn, tenant, url, request.wake)
        if request.initial_message is not None:
            message = SendRequest(
                payload=request.initial_message.payload,
                has_payload=True,
                message_type=request.initial_message.message_type,
            )
            await deliver(tx, tenant, entity, entity_type, message, creator)
        txid = await current_txid(conn)
    return SpawnResult(entity, txid)


def spawn_dispatch_policy(
    explicit: dict[str, Any] | None, parent: Entity | None, entity_type: EntityType
) -> dict[str, Any] | None:
    """The request's policy; else the parent's, rescoped to the type default's
    subscription when both point at the same place; else the type default (spec/03
    §5.11)."""
    if explicit is not None:
        return explicit
    default = entity_type.default_dispatch_policy
    if parent is None or parent.dispatch_policy is None:
        return default
    inherited: dict[str, Any] = parent.dispatch_policy
    if default is None:
        return inherited
    parent_target = inherited["targets"][0]
    default_target = default["targets"][0]
    if "subscription_id" in default_target and _same_destination(parent_target, default_target):
        scoped = {**parent_target, "subscription_id": default_target["subscription_id"]}
        return {"targets": [scoped]}
    return inherited


def _same_destination(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.get("type") != b.get("type"):
        return False
    if a.get("type") == "runner":
        return bool(a.get("runnerId") == b.get("runnerId"))
    return bool(a.get("url") == b.get("url"))


async def check_runner_targets(
    conn: asyncpg.Connection, tenant: str, policy: dict[str, Any] | None, creator: Principal
) -> None:
    """Runner dispatch needs an existing runner owned by the caller (spec/02 §3.4 step 3)."""
    for target in (policy or {}).get("targets", []):
        if target.get("type") != "runner":
            continue
        runner_id = target["runnerId"]
        owner = await conn.fetchval(
            "SELECT owner_principal FROM runners WHERE tenant_id = $1 AND id = $2",
            tenant,
            runner_id,
        )
        if owner is None:
            raise ApiError(404, "NOT_FOUND", f'Runner "{runner_id}" not found')
        if owner != creator.url:
            raise ApiError(403, "UNAUTHORIZED", "Runner dispatch requires the authenticated owner")


async def _register_wake(
    conn: asyncpg.Connection, tenant: str, source_url: str, wake: WakeRegistration
) -> None:
    """The spawn-time wake registration (spec/03 §4.1 #1), in the spawn's transaction, with
    the same one-per-manifest-key rule as every other registration (spec/03 §4.13)."""
    spec = WakeSpec(
        subscriber_url=wake.subscriber_url,
        source_url=source_url,
        condition=wake.condition,
        debounce_ms=wake.debounce_ms,
        timeout_ms=wake.timeout_ms,
        include_response=wake.include_response,
        manifest_key=wake.manifest_key,
    )
    await upsert_registration(conn, tenant, spec)

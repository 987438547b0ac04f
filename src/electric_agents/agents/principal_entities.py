"""Principal entities (spec/02 §5.4, spec/03 §5.16): every principal that spawns or sends
has an entity at its principal URL, created on first use with an `identity` event.

They are built in: they can receive sends (including `update_identity` from a built-in system
principal), be read and listed, and nothing else (guard B, spec/02 §3.4).
"""

from __future__ import annotations

import uuid
from typing import Any

from electric_agents.agents import events
from electric_agents.agents.entity_store import Entity, get_entity, now_ms
from electric_agents.agents.entity_streams import append_to_main, create_entity_with_streams
from electric_agents.agents.entity_type_store import get_entity_type, insert_entity_type_if_absent
from electric_agents.agents.entity_types import PRINCIPAL_TYPE_NAME, principal_entity_type
from electric_agents.agents.principals import Principal
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.errors import ApiError

UPDATE_IDENTITY = "update_identity"


def reject_principal_mutation(entity: Entity, action: str) -> None:
    """Guard B: `action` is the reference's past participle (`tagged`, `untagged`, ...)."""
    if entity.type == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400, "INVALID_REQUEST", f"Principal entities are built in and cannot be {action}"
        )


def identity_value(principal: Principal, epoch_ms: int) -> dict[str, Any]:
    timestamp = events.iso_timestamp(epoch_ms)
    return {
        "kind": principal.kind,
        "id": principal.id,
        "key": principal.key,
        "url": principal.url,
        "created_at": timestamp,
        "updated_at": timestamp,
    }


async def ensure_principal_entity(runtime: AgentsRuntime, principal: Principal) -> Entity:
    """The principal's entity, created (row, streams, `entity_created`, `identity`) in one
    transaction if it does not exist yet. Concurrent first uses create it once."""
    tenant = runtime.tenant_id
    async with runtime.pool.acquire() as conn:
        existing = await get_entity(conn, tenant, principal.url)
    if existing is not None:
        return existing
    created: Entity | None = None
    try:
        async with runtime.engine.transaction() as tx:
            principal_type = await get_entity_type(tx.conn, tenant, PRINCIPAL_TYPE_NAME)
            if principal_type is None:
                principal_type = principal_entity_type()
                await insert_entity_type_if_absent(tx.conn, tenant, principal_type)
            now = now_ms()
            args = {"kind": principal.kind, "id": principal.id, "key": principal.key}
            entity = Entity(
                url=principal.url,
                type=PRINCIPAL_TYPE_NAME,
                subscription_id=f"{PRINCIPAL_TYPE_NAME}-handler",
                write_token=str(uuid.uuid4()),
                tags={"principal_id": principal.id, "principal_kind": principal.kind},
                spawn_args=args,
                created_by=principal.url,
                type_revision=principal_type.revision,
                inbox_schemas=principal_type.inbox_schemas,
                state_schemas=principal_type.state_schemas,
                created_at=now,
                updated_at=now,
            )
            first = events.entity_created(PRINCIPAL_TYPE_NAME, now, args, None)
            await create_entity_with_streams(tx, tenant, entity, [first])
            await append_to_main(tx, entity, events.identity(identity_value(principal, now)))
            created = entity
    except ApiError as error:
        # Another request created it first (the insert waited for its commit).
        if error.code != "DUPLICATE_URL":
            raise
    if created is not None:
        return created
    async with runtime.pool.acquire() as conn:
        winner = await get_entity(conn, tenant, principal.url)
    if winner is None:
        raise ApiError(409, "DUPLICATE_URL", f'Entity already exists at URL "{principal.url}"')
    return winner

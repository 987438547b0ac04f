"""Server-side manifest writes (schedules, event-source subscriptions; spec/03 §5.7-§5.9):
the owner they are written for, locked for the transaction that appends the `manifest`
event and makes its side effects."""

from __future__ import annotations

from electric_agents.agents import inbox
from electric_agents.agents.entity_store import Entity, get_entity
from electric_agents.agents.principal_entities import reject_principal_mutation
from electric_agents.streams.engine import StreamTransaction


async def lock_manifest_owner(
    tx: StreamTransaction, tenant: str, owner_url: str, action: str
) -> Entity:
    """The owner under its row lock: 404 if gone, 400 for a principal (`action` names the
    refused operation, spec/02 §3.4 guard B), 409 once stopped or killed."""
    owner = await get_entity(tx.conn, tenant, owner_url, for_update=True)
    if owner is None:
        raise inbox.entity_not_found()
    reject_principal_mutation(owner, action)
    if owner.status in ("stopped", "killed"):
        # Its streams are closed: the manifest event could not be written.
        raise inbox.not_running()
    return owner

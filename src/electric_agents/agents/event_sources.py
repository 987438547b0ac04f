"""Event-source subscriptions (spec/02 §3.4 `PUT|DELETE …/event-source-subscriptions/:id`,
spec/03 §5.9).

Each operation is one transaction under the owner's row lock: the webhook stream, the
manifest event on the owner's main stream, the wake registration and the pending expiry
commit together. (The reference appended the manifest and registered the wake separately
and never repaired a failure in between.)

What the reference only recorded is enforced here:
* `lifetime` `expires_at`: an `event_source_expiry` scheduled task removes the registration
  and writes the manifest delete at that time; `until_entity_stopped` ends with the
  entity, whose terminal entry removes all its registrations; `manual` only by DELETE.
* `filterKey`: the bucket filter's condition travels in the registration's condition
  (`filter`), and wake matching applies it (agents/wake_conditions.py).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from electric_agents.agents import scheduled_task_store as task_store
from electric_agents.agents import wake_registration_store as wake_store
from electric_agents.agents.entity_store import get_entity, lock_entity_nowait, now_ms
from electric_agents.agents.entity_streams import append_to_main
from electric_agents.agents.event_source_catalog import (
    WEBHOOK_WAKE,
    EventSourceCatalog,
    ResolvedSubscription,
    SubscriptionRequest,
    parse_expires_at,
    resolve_subscription,
)
from electric_agents.agents.events import JSON_CONTENT_TYPE, iso_from_datetime, stream_path
from electric_agents.agents.manifest_owner import lock_manifest_owner
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedule_events import manifest_delete, manifest_upsert
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.lifecycle import CreateSpec

log = logging.getLogger(__name__)

SUBSCRIBED = "subscribed to event sources"
UNSUBSCRIBED = "unsubscribed from event sources"


@dataclass(frozen=True)
class UpsertResult:
    txid: str
    subscription: dict[str, Any]
    expires_at: datetime | None


def manifest_key(subscription_id: str) -> str:
    return f"event-source:{subscription_id}"


def resolve(
    catalog: EventSourceCatalog | None,
    entity_url: str,
    subscription_id: str,
    request: SubscriptionRequest,
) -> ResolvedSubscription:
    """Steps 1-2 of spec/03 §5.9 after the principal guard: the catalog, the source, the
    lifetime's timestamp, then the resolver's checks."""
    if catalog is None:
        raise ApiError(404, "NOT_FOUND", "No event source catalog is configured")
    contract = catalog.get(request.source_key)
    if contract is None:
        raise ApiError(404, "NOT_FOUND", f'Event source "{request.source_key}" not found')
    lifetime = request.lifetime or {}
    if lifetime.get("kind") == "expires_at":
        parse_expires_at(str(lifetime.get("at", "")))
    created_at = iso_from_datetime(datetime.now(UTC))
    return resolve_subscription(contract, entity_url, request, subscription_id, created_at)


async def upsert_subscription(
    runtime: AgentsRuntime, owner_url: str, resolved: ResolvedSubscription
) -> UpsertResult:
    """Create or replace the subscription: one transaction for the webhook stream, the
    manifest upsert, the registration and the expiry."""
    key = resolved.manifest_key
    txid = str(uuid.uuid4())
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        owner = await lock_manifest_owner(tx, tenant, owner_url, SUBSCRIBED)
        # ensureEventSourceWakeSource: the stream exists, so webhook deliveries can append.
        await _ensure_webhook_stream(tx, resolved.source_url)
        await append_to_main(
            tx, owner, manifest_upsert(key, resolved.manifest_entry, txid, now_ms())
        )
        await task_store.cancel_event_source_expiry(tx.conn, tenant, owner.url, key)
        condition: dict[str, Any] = dict(WEBHOOK_WAKE)
        if resolved.filter_condition is not None:
            condition["filter"] = resolved.filter_condition
        await wake_store.delete_by_manifest_key(tx.conn, tenant, owner.url, key)
        await wake_store.upsert_registration(
            tx.conn,
            tenant,
            wake_store.WakeSpec(
                subscriber_url=owner.url,
                source_url=resolved.source_url,
                condition=condition,
                manifest_key=key,
            ),
        )
        if resolved.expires_at is not None:
            await task_store.insert_event_source_expiry(
                tx.conn, tenant, owner.url, key, resolved.expires_at, txid
            )
    return UpsertResult(txid, resolved.subscription, resolved.expires_at)


async def delete_subscription(runtime: AgentsRuntime, owner_url: str, subscription_id: str) -> str:
    """DELETE: the manifest delete, the registration and any pending expiry, together.
    Idempotent, like the reference (an unknown id still writes the delete)."""
    key = manifest_key(subscription_id)
    txid = str(uuid.uuid4())
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        owner = await lock_manifest_owner(tx, tenant, owner_url, UNSUBSCRIBED)
        await append_to_main(tx, owner, manifest_delete(key, txid, now_ms()))
        await task_store.cancel_event_source_expiry(tx.conn, tenant, owner.url, key)
        await wake_store.delete_by_manifest_key(tx.conn, tenant, owner.url, key)
    return txid


async def expire_subscription(
    tx: StreamTransaction, tenant: str, task: task_store.ScheduledTask
) -> None:
    """Run an `event_source_expiry` task in the scheduler's transaction. The owner's lock
    is only tried: a request holding it may be waiting to cancel this very task, so a busy
    owner makes the task retry shortly instead of deadlocking."""
    owner_url, key = task.owner_entity_url, task.manifest_key
    if owner_url is None or key is None:
        raise ApiError(400, "INVALID_REQUEST", "Event-source expiry without its subscription")
    locked = await lock_entity_nowait(tx.conn, tenant, owner_url)
    if locked is False:
        raise ApiError(503, "OWNER_BUSY", f"{owner_url} is locked; expiry retried")
    owner = await get_entity(tx.conn, tenant, owner_url) if locked else None
    removed = await wake_store.delete_by_manifest_key(tx.conn, tenant, owner_url, key)
    # Nothing removed: another expiry of this subscription (a second task written by a
    # replayed manifest, in this or another process) already ended it.
    if removed and owner is not None and owner.status not in ("stopped", "killed"):
        await append_to_main(tx, owner, manifest_delete(key, str(uuid.uuid4()), now_ms()))
        log.info("event-source subscription %s of %s expired", key, owner_url)
    elif removed:
        log.info("event-source subscription %s of gone %s expired", key, owner_url)
    await task_store.complete_task(tx.conn, task.id)


async def _ensure_webhook_stream(tx: StreamTransaction, source_url: str) -> None:
    try:
        await tx.create(CreateSpec(stream_path(source_url), JSON_CONTENT_TYPE))
    except ApiError as error:
        # Already there (created by a webhook delivery or another subscription).
        if error.status != 409:
            raise

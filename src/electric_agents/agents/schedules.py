"""Per-entity schedules and cron sources (spec/02 §3.2 `cron/register`, §3.4 `schedules`;
spec/03 §5.7, §5.8).

Each operation is one transaction under the owner's row lock: the wake registration, the
cron chain or the pending send, and the manifest event on the owner's main stream commit
together, so a schedule is never half written.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from electric_agents.agents import cron, inbox
from electric_agents.agents import scheduled_task_store as store
from electric_agents.agents import wake_registration_store as wake_store
from electric_agents.agents.entity_store import Entity, get_entity, now_ms
from electric_agents.agents.entity_streams import append_to_main
from electric_agents.agents.entity_type_store import get_entity_type
from electric_agents.agents.event_source_catalog import parse_expires_at
from electric_agents.agents.events import iso_from_datetime
from electric_agents.agents.manifest_owner import lock_manifest_owner
from electric_agents.agents.manifest_wakes import manifest_events, non_empty_string
from electric_agents.agents.principal_entities import ensure_principal_entity
from electric_agents.agents.principals import Principal
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedule_events import manifest_delete, manifest_upsert
from electric_agents.agents.scheduler import ensure_cron_chain
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    timezone: str | None
    payload: Any
    debounce_ms: int | None = None
    timeout_ms: int | None = None


@dataclass(frozen=True)
class FutureSendSchedule:
    payload: Any
    fire_at: str
    target_url: str | None = None
    message_type: str | None = None
    claimed_from: str | None = None


def manifest_key(schedule_id: str) -> str:
    return f"schedule:{schedule_id}"


async def register_cron_source(
    runtime: AgentsRuntime, expression: str, timezone: str | None
) -> str:
    """POST /_electric/cron/register: the shared tick stream of (expression, timezone)."""
    zone, _ = cron.validate_schedule(expression, timezone)
    async with runtime.engine.transaction() as tx:
        return await ensure_cron_chain(tx, runtime.tenant_id, expression, zone)


async def upsert_cron_schedule(
    runtime: AgentsRuntime, owner_url: str, schedule_id: str, schedule: CronSchedule
) -> str:
    """PUT …/schedules/:id with `scheduleType: cron`; returns the manifest txid."""
    zone, _ = cron.validate_schedule(schedule.expression, schedule.timezone)
    key = manifest_key(schedule_id)
    txid = str(uuid.uuid4())
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        owner = await lock_manifest_owner(tx, tenant, owner_url, "scheduled")
        stream_url = await ensure_cron_chain(tx, tenant, schedule.expression, zone)
        # The key may have named a future send before: that one is replaced too.
        await store.cancel_manifest_sends(tx.conn, tenant, owner.url, key)
        await _replace_wake_registration(tx.conn, tenant, owner.url, stream_url, key, schedule)
        wake: dict[str, Any] = {"on": "change"}
        if schedule.debounce_ms is not None:
            wake["debounceMs"] = schedule.debounce_ms
        if schedule.timeout_ms is not None:
            wake["timeoutMs"] = schedule.timeout_ms
        value = {
            "key": key,
            "kind": "schedule",
            "id": schedule_id,
            "scheduleType": "cron",
            "expression": schedule.expression,
            "timezone": zone,
            "payload": schedule.payload,
            "wake": wake,
        }
        await append_to_main(tx, owner, manifest_upsert(key, value, txid, now_ms()))
    return txid


async def upsert_future_send(
    runtime: AgentsRuntime,
    sender: Principal,
    owner_url: str,
    schedule_id: str,
    schedule: FutureSendSchedule,
) -> str:
    """PUT …/schedules/:id with `scheduleType: future_send`: the send is checked now, and
    replaces any pending send of the same schedule; returns the manifest txid."""
    if schedule.claimed_from is not None and schedule.claimed_from != sender.url:
        raise ApiError(400, "INVALID_REQUEST", "Request from must match Electric-Principal")
    fire_at = parse_fire_at(schedule.fire_at)
    await ensure_principal_entity(runtime, sender)
    key = manifest_key(schedule_id)
    txid = str(uuid.uuid4())
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        owner = await lock_manifest_owner(tx, tenant, owner_url, "scheduled")
        target_url = schedule.target_url or owner.url
        target = owner if target_url == owner.url else await get_entity(tx.conn, tenant, target_url)
        if target is None:
            raise inbox.entity_not_found()
        request = inbox.SendRequest(
            payload=schedule.payload, has_payload=True, message_type=schedule.message_type
        )
        target_type = await get_entity_type(tx.conn, tenant, target.type)
        inbox.check_send(target, target_type, request, sender)
        producer_id = f"future-send-{uuid.uuid4()}"
        entry: dict[str, Any] = {
            "key": key,
            "kind": "schedule",
            "id": schedule_id,
            "scheduleType": "future_send",
            "fireAt": iso_from_datetime(fire_at),
            "targetUrl": target.url,
            "senderUrl": sender.url,
            "payload": schedule.payload,
            "producerId": producer_id,
        }
        if schedule.message_type is not None:
            entry["messageType"] = schedule.message_type
        entry["status"] = "pending"
        task_payload: dict[str, Any] = {
            "entityUrl": target.url,
            "from": sender.url,
            "payload": schedule.payload,
            "key": f"scheduled-{producer_id}",
        }
        if schedule.message_type is not None:
            task_payload["type"] = schedule.message_type
        task_payload["producerId"] = producer_id
        task_payload["manifest"] = {"ownerEntityUrl": owner.url, "key": key, "entry": entry}
        await _delete_wake_registration(tx.conn, tenant, owner.url, key)
        await store.cancel_manifest_sends(tx.conn, tenant, owner.url, key)
        await store.insert_delayed_send(
            tx.conn, tenant, task_payload, fire_at, owner_entity_url=owner.url, manifest_key=key
        )
        await append_to_main(tx, owner, manifest_upsert(key, entry, txid, now_ms()))
    return txid


async def delete_schedule(runtime: AgentsRuntime, owner_url: str, schedule_id: str) -> str:
    """DELETE …/schedules/:id: idempotent; cancels the pending send, drops the wake
    registration and writes the manifest delete. Returns its txid."""
    key = manifest_key(schedule_id)
    txid = str(uuid.uuid4())
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        owner = await lock_manifest_owner(tx, tenant, owner_url, "unscheduled")
        await store.cancel_manifest_sends(tx.conn, tenant, owner.url, key)
        await _delete_wake_registration(tx.conn, tenant, owner.url, key)
        await append_to_main(tx, owner, manifest_delete(key, txid, now_ms()))
    return txid


async def sync_manifest_schedules(runtime: AgentsRuntime, owner: Entity, events: list[Any]) -> None:
    """Scheduler side effects of `manifest` events a handler appended through the proxy
    (spec/03 §3.6.3): a pending `future_send` entry (re)schedules its send, any other entry
    or a delete cancels the key's pending send, and a cron `schedule` or `source` entry
    ensures its cron chain. Wake registrations are the wake system's part. Each event is
    its own transaction; a bad entry is logged and skipped (the append already succeeded)."""
    for key, operation, value in manifest_events(events):
        try:
            async with runtime.engine.transaction() as tx:
                await sync_manifest_entry(tx, runtime.tenant_id, owner, key, operation, value)
        except ApiError as error:
            log.warning("manifest entry %s of %s not scheduled: %s", key, owner.url, error)


async def sync_manifest_entry(
    tx: StreamTransaction,
    tenant: str,
    owner: Entity,
    key: str,
    operation: Any,
    value: Any,
) -> None:
    await store.cancel_manifest_sends(tx.conn, tenant, owner.url, key)
    active = operation != "delete" and isinstance(value, dict)
    expires_at = _event_source_expiry(value) if active else None
    if expires_at is None:
        await store.cancel_event_source_expiry(tx.conn, tenant, owner.url, key)
    elif not await store.has_event_source_expiry(tx.conn, tenant, owner.url, key, expires_at):
        # An event-source entry a handler (re)wrote itself ends when its lifetime says,
        # like one made through the subscription route; a replay of the same entry keeps
        # the task it already has.
        await store.cancel_event_source_expiry(tx.conn, tenant, owner.url, key)
        await store.insert_event_source_expiry(
            tx.conn, tenant, owner.url, key, expires_at, "manifest"
        )
    if not active or expires_at is not None:
        return
    if (
        value.get("kind") == "schedule"
        and value.get("scheduleType") == "future_send"
        and value.get("status") in (None, "pending")
    ):
        await _schedule_manifest_send(tx, tenant, owner, key, value)
        return
    cron_spec = _manifest_cron_spec(value)
    if cron_spec is not None:
        expression, timezone = cron_spec
        zone, _ = cron.validate_schedule(expression, timezone)
        await ensure_cron_chain(tx, tenant, expression, zone)


async def _schedule_manifest_send(
    tx: StreamTransaction, tenant: str, owner: Entity, key: str, entry: dict[str, Any]
) -> None:
    """syncManifestDelayedSend: the entry's send replaces any pending one of its key; it is
    checked when it fires, as in the reference."""
    fire_at = parse_fire_at(str(entry.get("fireAt", "")))
    producer_id = entry.get("producerId")
    if not isinstance(producer_id, str) or not producer_id:
        producer_id = f"future-send-{uuid.uuid4()}"
    task_payload: dict[str, Any] = {
        "entityUrl": non_empty_string(entry.get("targetUrl")) or owner.url,
        "from": non_empty_string(entry.get("senderUrl")) or owner.url,
        "key": f"scheduled-{producer_id}",
    }
    if "payload" in entry:
        task_payload["payload"] = entry["payload"]
    if non_empty_string(entry.get("messageType")):
        task_payload["type"] = entry["messageType"]
    task_payload["producerId"] = producer_id
    task_payload["manifest"] = {"ownerEntityUrl": owner.url, "key": key, "entry": entry}
    await store.insert_delayed_send(
        tx.conn, tenant, task_payload, fire_at, owner_entity_url=owner.url, manifest_key=key
    )


def _manifest_cron_spec(value: dict[str, Any]) -> tuple[str, str | None] | None:
    """(expression, timezone) of a cron `schedule` or cron `source` entry."""
    if value.get("kind") == "schedule" and value.get("scheduleType") == "cron":
        spec: Any = value
    elif value.get("kind") == "source" and value.get("sourceType") == "cron":
        spec = value.get("config")
    else:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("expression"), str):
        return None
    timezone = spec.get("timezone")
    return spec["expression"], timezone if isinstance(timezone, str) else None


def _event_source_expiry(value: dict[str, Any]) -> datetime | None:
    """The `expires_at` of a webhook source entry's event-source lifetime, if it has one."""
    if value.get("kind") != "source" or value.get("sourceType") != "webhook":
        return None
    config = value.get("config")
    source = config.get("eventSource") if isinstance(config, dict) else None
    lifetime = source.get("lifetime") if isinstance(source, dict) else None
    if not isinstance(lifetime, dict) or lifetime.get("kind") != "expires_at":
        return None
    return parse_expires_at(str(lifetime.get("at", "")))


def parse_fire_at(text: str) -> datetime:
    """An ISO 8601 time as JavaScript's `Date` reads it (no offset: UTC here)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ApiError(400, "INVALID_REQUEST", f"Invalid fireAt timestamp: {text}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


async def _delete_wake_registration(
    conn: asyncpg.Connection, tenant: str, subscriber_url: str, key: str
) -> None:
    # unregisterByManifestKey (spec/03 §4.12).
    await wake_store.delete_by_manifest_key(conn, tenant, subscriber_url, key)


async def _replace_wake_registration(
    conn: asyncpg.Connection,
    tenant: str,
    subscriber_url: str,
    source_url: str,
    key: str,
    schedule: CronSchedule,
) -> None:
    """One registration per (entity, manifest key): the cron stream, on any change."""
    await _delete_wake_registration(conn, tenant, subscriber_url, key)
    await wake_store.upsert_registration(
        conn,
        tenant,
        wake_store.WakeSpec(
            subscriber_url=subscriber_url,
            source_url=source_url,
            condition={"on": "change"},
            debounce_ms=max(0, schedule.debounce_ms or 0),
            timeout_ms=max(0, schedule.timeout_ms or 0),
            manifest_key=key,
        ),
    )

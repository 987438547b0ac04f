"""The wake system (spec/03 §4): registering, evaluating appended events, and delivering
`wake` events to subscribers' main streams.

Crash safety (a fix of spec/03 §6.5, where a crash between an append and its evaluation
lost the wake): evaluation runs in the transaction of the source append itself, so the
source event, the timeout it cancels, the debounce buffer it fills and the wake it delivers
commit together. Debounce buffers and timeouts are rows (migration 0009) that
`WakeDeadlineWorker` claims with FOR UPDATE SKIP LOCKED and delivers in the claim's
transaction, so a pending wake survives kill -9 and fires exactly once across processes.

The wake append uses the reference's idempotent producer `wake-reg-<regId>-<sourceEventKey>`
(epoch 0, seq 0), so a repeated delivery of one source event is appended once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from electric_agents.agents.entity_store import get_entity
from electric_agents.agents.events import JSON_CONTENT_TYPE, iso_from_datetime, stream_path
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.wake_conditions import match_condition, source_event_key
from electric_agents.agents.wake_registration_store import (
    WakeRow,
    WakeSpec,
    buffer_change,
    claim_due_debounce,
    claim_due_timeout,
    consume_timeout,
    delete_registration,
    registrations_for_source,
    seconds_to_next_deadline,
    upsert_registration,
)
from electric_agents.errors import ApiError
from electric_agents.streams import store
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.producers import MAX_PRODUCER_ID_LENGTH, ProducerHeaders

log = logging.getLogger(__name__)

# How long the deadline worker sleeps at most: the latency bound for deadlines set by
# another process (this process's own deadlines are no later than this either).
DEADLINE_POLL_S = 0.2
FAILED_RESPONSE = "Failed to load child response"


async def register_wake(runtime: AgentsRuntime, spec: WakeSpec) -> bool:
    """`POST /_electric/wake` (spec/02 §3.2): one registration per (subscriber,
    manifestKey), identical ones ignored. True if a row was inserted."""
    async with runtime.pool.acquire() as conn, conn.transaction():
        return await upsert_registration(conn, runtime.tenant_id, spec)


# --- evaluation ----------------------------------------------------------------------------


async def evaluate_wakes(
    tx: StreamTransaction, tenant: str, source_url: str, events: list[Any]
) -> int:
    """Evaluate appended `events` of `source_url` against its registrations, inside the
    append's transaction (spec/03 §4.5). Returns how many wakes were appended now."""
    conn = tx.conn
    registrations = await registrations_for_source(conn, tenant, source_url, for_update=True)
    if not registrations:
        return 0
    consumed: set[int] = set()
    removed: set[int] = set()
    delivered = 0
    for event in events:
        if not isinstance(event, dict):
            continue
        event_key: str | None = None
        for registration in registrations:
            if registration.id in removed:
                continue
            match = match_condition(registration.condition, event)
            if match is None:
                continue
            if (
                registration.timeout_ms > 0
                and not registration.timeout_consumed
                and registration.id not in consumed
            ):
                # A match cancels the timeout for good (spec/03 §4.5 step 1).
                await consume_timeout(conn, registration.id)
                consumed.add(registration.id)
            if registration.debounce_ms > 0:
                # Delivered by the deadline worker; a one-shot registration is removed when
                # its batch is delivered (the reference removed it at once and so never
                # delivered a debounced one-shot wake, spec/03 §4.8).
                await buffer_change(
                    conn, tenant, registration, match.change, match.run_finished_status
                )
                continue
            if event_key is None:
                event_key = source_event_key(event)
            if await deliver_wake(
                tx,
                tenant,
                registration,
                event_key=event_key,
                changes=[match.change],
                timeout=False,
                run_finished_status=match.run_finished_status,
            ):
                delivered += 1
            if registration.one_shot:
                await delete_registration(conn, registration.id)
                removed.add(registration.id)
    return delivered


# --- delivery ------------------------------------------------------------------------------


async def deliver_wake(
    tx: StreamTransaction,
    tenant: str,
    registration: WakeRow,
    *,
    event_key: str,
    changes: list[dict[str, Any]],
    timeout: bool,
    run_finished_status: str | None,
) -> bool:
    """Append the `wake` event for one result to the subscriber's main stream (spec/03
    §4.9). A missing subscriber or source, or a refused append (a closed stream), is
    logged and dropped without failing the caller's transaction. True if appended."""
    conn = tx.conn
    subscriber = await get_entity(conn, tenant, registration.subscriber_url)
    if subscriber is None:
        return False
    value: dict[str, Any] = {
        "timestamp": iso_from_datetime(datetime.now(UTC)),
        "source": registration.source_url,
        "timeout": timeout,
        "changes": changes,
    }
    if run_finished_status is not None:
        source = await get_entity(conn, tenant, registration.source_url)
        if source is None:
            log.warning(
                "runFinished wake %d: source entity %s is missing; dropped",
                registration.id,
                registration.source_url,
            )
            return False
        # Only a real child's finish carries `finished_child`; other observers get the
        # plain message.
        if source.parent == subscriber.url:
            finished: dict[str, Any] = {
                "url": source.url,
                "type": source.type,
                "run_status": run_finished_status,
            }
            if registration.include_response:
                run_key = changes[-1]["key"] if changes else "run"
                finished.update(
                    await _child_response(conn, source.main_stream, run_key, run_finished_status)
                )
            value["finished_child"] = finished
    key = f"wake-{registration.id}-{event_key}"
    event = {"type": "wake", "key": key, "value": value, "headers": {"operation": "insert"}}
    try:
        # A savepoint: a subscriber whose stream is closed must not undo the source append.
        async with conn.transaction():
            await tx.append(
                stream_path(subscriber.main_stream),
                content_type=JSON_CONTENT_TYPE,
                body=orjson.dumps(event),
                producer=ProducerHeaders(wake_producer_id(registration.id, event_key), 0, 0),
            )
    except ApiError as error:
        log.warning(
            "wake %s for %s not appended: %s %s",
            key[:200],
            subscriber.url,
            error.status,
            error.message,
        )
        return False
    except asyncpg.DeadlockDetectedError:
        raise  # the whole transaction is retried
    except asyncpg.PostgresError as error:
        # Dropping this wake keeps the source append (and the other wakes) alive.
        log.error("wake %s for %s failed: %s", key[:200], subscriber.url, error)
        return False
    return True


def wake_producer_id(registration_id: int, event_key: str) -> str:
    """`wake-reg-<regId>-<sourceEventKey>` (spec/03 §4.9). An event key too long for a
    producer id (keys are client data) is replaced by its digest, which dedupes alike."""
    producer_id = f"wake-reg-{registration_id}-{event_key}"
    if len(producer_id) <= MAX_PRODUCER_ID_LENGTH:
        return producer_id
    digest = hashlib.sha256(event_key.encode()).hexdigest()
    return f"wake-reg-{registration_id}-sha256:{digest}"


async def _child_response(
    conn: asyncpg.Connection, main_stream: str, run_key: str, run_status: str
) -> dict[str, Any]:
    """`response` (the run's text deltas, in order) and, for a failed run, `error` (its
    error messages joined by newlines), read from the child's whole main stream."""
    try:
        values = await _read_all_values(conn, stream_path(main_stream))
    except (ApiError, asyncpg.PostgresError, orjson.JSONDecodeError) as error:
        log.warning("reading %s for a wake failed: %s", main_stream, error)
        return {"error": FAILED_RESPONSE}
    deltas: list[str] = []
    errors: list[str] = []
    for event in values:
        if not isinstance(event, dict):
            continue
        value = event.get("value")
        if not isinstance(value, dict) or value.get("run_id") != run_key:
            continue
        if event.get("type") == "text_delta" and isinstance(value.get("delta"), str):
            deltas.append(value["delta"])
        elif event.get("type") == "error" and isinstance(value.get("message"), str):
            errors.append(value["message"])
    out: dict[str, Any] = {}
    response = "".join(deltas)
    if response:
        out["response"] = response
    if run_status == "failed":
        out["error"] = "\n".join(errors)
    return out


async def _read_all_values(conn: asyncpg.Connection, path: str) -> list[Any]:
    meta = await store.get_meta(conn, path)
    if meta is None:
        raise ApiError(404, "STREAM_NOT_FOUND", "Stream not found")
    return await store.read_json_values(conn, meta)


# --- deadlines -----------------------------------------------------------------------------


class WakeDeadlineWorker:
    """Delivers debounced batches and timeouts when they fall due (spec/03 §4.6, §4.7).
    Each delivery commits with the removal of its buffer (or the consumption of its
    timeout), so a crash either delivers it or leaves it due."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime

    async def run(self) -> None:
        while True:
            if await self.fire_due():
                continue
            async with self.runtime.pool.acquire() as conn:
                wait = await seconds_to_next_deadline(conn, self.runtime.tenant_id)
            delay = DEADLINE_POLL_S if wait is None else min(max(wait, 0.005), DEADLINE_POLL_S)
            await asyncio.sleep(delay)

    async def fire_due(self) -> int:
        """Deliver everything due now, one transaction each; returns how many."""
        fired = 0
        while await self._fire_one():
            fired += 1
        return fired

    async def _fire_one(self) -> bool:
        tenant = self.runtime.tenant_id
        async with self.runtime.engine.transaction() as tx:
            buffer = await claim_due_debounce(tx.conn, tenant)
            if buffer is not None:
                registration = buffer.registration
                changes = buffer.changes
                await deliver_wake(
                    tx,
                    tenant,
                    registration,
                    # The batch is named after its last change (spec/03 §4.6).
                    event_key=str(changes[-1]["key"]) if changes else "debounce",
                    changes=changes,
                    timeout=False,
                    run_finished_status=buffer.run_finished_status,
                )
                if registration.one_shot:
                    await delete_registration(tx.conn, registration.id)
                return True
            registration = await claim_due_timeout(tx.conn, tenant)
            if registration is None:
                return False
            await deliver_wake(
                tx,
                tenant,
                registration,
                event_key="timeout",
                changes=[],
                timeout=True,
                run_finished_status=None,
            )
            await consume_timeout(tx.conn, registration.id)
            return True

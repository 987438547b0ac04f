"""The scheduler: fires due `scheduled_tasks` (spec/03 §5.7, §5.8; spec/02 §4.12).

One `Scheduler` per server process, any number of processes per database. Each task is
fired in one transaction that takes its row (`FOR UPDATE SKIP LOCKED`), performs it (the
inbox append of a delayed send, or the cron tick append and the next tick's row) and marks
it complete: a task fires once per due time whatever crashes or how many processes run.

Reference behaviour fixed here:
* a transient failure waits an exponential backoff (`retry_at`) instead of being
  re-claimed in a tight loop;
* a delayed send keeps its `mode` and `position` (quirk 8 dropped them at fire time);
* a cron chain nobody watches (no wake registration on its stream, and nobody registered
  it for `UNWATCHED_GRACE_MS`) ends instead of ticking forever; registering it again
  restarts it;
* after downtime a chain fires one overdue tick and resumes from now, instead of firing
  every missed tick back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from electric_agents.agents import cron, events, inbox
from electric_agents.agents import scheduled_task_store as store
from electric_agents.agents.entity_store import get_entity, now_ms
from electric_agents.agents.entity_streams import append_to_main
from electric_agents.agents.event_sources import expire_subscription
from electric_agents.agents.principals import parse_principal
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedule_events import manifest_status_update
from electric_agents.agents.wakes import evaluate_wakes
from electric_agents.db.held import listening
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.lifecycle import CreateSpec
from electric_agents.streams.producers import ProducerHeaders

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "scheduled_tasks_wake"  # raised by the insert trigger (migration 0008)
SAFETY_POLL_S = 5.0  # in case a notification is lost with its connection
ERROR_PAUSE_S = 1.0
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
UNWATCHED_GRACE_MS = 5 * 60 * 1000
# After this many failed attempts (about an hour of backoff) a task is given up on.
MAX_ATTEMPTS = 20
# 4xx codes that describe a passing state, not a bad task: retried like a 5xx.
TRANSIENT_CODES = frozenset({"FORK_IN_PROGRESS", "STREAM_CONFLICT"})


@dataclass(frozen=True)
class _UrlSender:
    """The sender of a future send a handler wrote into its manifest: whatever URL the
    entry names (the owner by default), never a system principal."""

    url: str
    is_system: bool = False


class Scheduler:
    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """A task was inserted (here or, through NOTIFY, anywhere): look again now."""
        self._nudged.set()

    async def run(self) -> None:
        async with listening(self.runtime.pool, NOTIFY_CHANNEL, self._nudged.set) as listener:
            await self._rehydrate_watched_chains()
            while True:
                if listener.is_closed():
                    # The supervisor restarts the worker with a fresh LISTEN connection.
                    raise ConnectionError("scheduler LISTEN connection lost")
                self._nudged.clear()
                try:
                    await self.fire_due()
                    delay = await self._seconds_until_next_due()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    log.warning("scheduler pass failed, retrying: %s", error)
                    delay = ERROR_PAUSE_S
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._nudged.wait(), delay)

    async def _seconds_until_next_due(self) -> float:
        async with self.runtime.pool.acquire() as conn:
            due_in = await store.seconds_until_next_due(conn, self.runtime.tenant_id)
        if due_in is None:
            return SAFETY_POLL_S
        return min(SAFETY_POLL_S, max(0.0, due_in))

    async def _rehydrate_watched_chains(self) -> None:
        """Startup (spec/02 §2 step "rehydrate cron schedules"): every cron stream some
        registration watches has a stream and a pending tick."""
        async with self.runtime.pool.acquire() as conn:
            urls = await store.watched_cron_streams(conn, self.runtime.tenant_id)
        for url in urls:
            spec = cron.parse_cron_stream_url(url)
            if spec is None:
                continue
            try:
                async with self.runtime.engine.transaction() as tx:
                    await ensure_cron_chain(tx, self.runtime.tenant_id, *spec)
            except ApiError as error:
                log.warning("cannot restart the cron chain of %s: %s", url, error)

    async def fire_due(self) -> int:
        """Fire due tasks until none is left; returns how many were taken."""
        fired = 0
        while await self._fire_one():
            fired += 1
        return fired

    async def _fire_one(self) -> bool:
        tenant = self.runtime.tenant_id
        task: store.ScheduledTask | None = None
        try:
            async with self.runtime.engine.transaction() as tx:
                task = await store.claim_due_task(tx.conn, tenant)
                if task is None:
                    return False
                await self._execute(tx, task)
            return True
        except ApiError as error:
            if task is None:
                raise
            failure: Exception = error
        except Exception as error:
            # Whatever went wrong with this task (a bug included) is recorded on it and
            # retried later, instead of stopping every other task behind it.
            if task is None or isinstance(error, OSError | asyncpg.InterfaceError):
                raise
            log.exception("scheduled task %d (%s) raised", task.id, task.kind)
            failure = error
        # The execution rolled back as a whole (so no half-done append survives); record
        # the outcome in a transaction of its own.
        await self._record_failure(task, failure)
        return True

    async def _execute(self, tx: StreamTransaction, task: store.ScheduledTask) -> None:
        if task.kind == "cron_tick":
            await self._fire_cron_tick(tx, task)
        elif task.kind == "event_source_expiry":
            await expire_subscription(tx, self.runtime.tenant_id, task)
        else:
            await self._fire_delayed_send(tx, task)

    # --- delayed and future sends -------------------------------------------------------

    async def _fire_delayed_send(self, tx: StreamTransaction, task: store.ScheduledTask) -> None:
        payload = task.payload
        sender_url = payload.get("from")
        if not isinstance(sender_url, str) or not sender_url:
            raise ApiError(400, "INVALID_REQUEST", "Scheduled send has no sender")
        sender: inbox.Sender = parse_principal(sender_url) or _UrlSender(sender_url)
        request = inbox.SendRequest(
            payload=payload.get("payload"),
            has_payload="payload" in payload,
            key=payload.get("key") or f"scheduled-task-{task.id}",
            message_type=payload.get("type"),
            mode=payload.get("mode"),
            position=payload.get("position"),
        )
        await inbox.send_in(tx, self.runtime, sender, payload["entityUrl"], request)
        manifest = payload.get("manifest")
        if isinstance(manifest, dict):
            await self._settle_future_send(tx, manifest, "sent", None)
        await store.complete_task(tx.conn, task.id)

    async def _settle_future_send(
        self, tx: StreamTransaction, manifest: dict[str, Any], status: str, error: str | None
    ) -> None:
        """The owner's manifest entry becomes `sent` or `failed` (spec/03 §5.8). An owner
        that stopped meanwhile keeps its last entry: its stream takes no more writes."""
        owner = await get_entity(tx.conn, self.runtime.tenant_id, manifest["ownerEntityUrl"])
        if owner is None or owner.status in ("stopped", "killed"):
            log.info(
                "future send %s settled %s; owner %s is gone, manifest left as it was",
                manifest.get("key"),
                status,
                manifest.get("ownerEntityUrl"),
            )
            return
        event = manifest_status_update(manifest["key"], manifest["entry"], status, error, now_ms())
        try:
            # A savepoint: a refused append (checked before anything is written) must not
            # undo the task's own outcome.
            async with tx.conn.transaction():
                await append_to_main(tx, owner, event)
        except ApiError as refused:
            log.warning(
                "future send %s settled %s; manifest of %s not updated: %s",
                manifest.get("key"),
                status,
                owner.url,
                refused,
            )

    # --- cron ticks -------------------------------------------------------------------------

    async def _fire_cron_tick(self, tx: StreamTransaction, task: store.ScheduledTask) -> None:
        tenant = self.runtime.tenant_id
        expression, timezone = task.cron_expression, task.cron_timezone
        tick = task.cron_tick_number
        if expression is None or timezone is None or tick is None:
            raise ApiError(400, "INVALID_REQUEST", "Cron task without its schedule")
        stream_url = cron.cron_stream_url(expression, timezone)
        await store.lock_cron_chain(tx.conn, tenant, expression, timezone)
        fired_ms = now_ms()
        registered_ms = task.payload.get("registeredAtMs")
        recently_registered = (
            isinstance(registered_ms, int) and fired_ms - registered_ms < UNWATCHED_GRACE_MS
        )
        if not recently_registered and not await store.has_cron_watchers(
            tx.conn, tenant, stream_url
        ):
            log.info("cron chain %s has no watchers; stopped at tick %d", stream_url, tick)
            await store.complete_task(tx.conn, task.id, "no watchers: cron chain stopped")
            return
        parsed = cron.parse_cron(expression)
        fired_at = events.iso_timestamp(fired_ms)
        tick_event = {
            "type": "cron_tick",
            "key": f"tick-{tick}",
            "value": {
                "expression": expression,
                "timezone": timezone,
                "firedAt": fired_at,
                "tickNumber": tick,
            },
            "headers": {"operation": "insert", "timestamp": fired_at},
        }
        encoded = stream_url[len(cron.CRON_STREAM_PREFIX) :]
        await tx.append(
            events.stream_path(stream_url),
            content_type=events.JSON_CONTENT_TYPE,
            body=events.encode(tick_event),
            producer=ProducerHeaders(f"scheduler-cron-{encoded}-{tick}", 0, 0),
        )
        # Watchers of the cron stream are woken in this transaction, so a tick and its
        # wakes commit together (spec/03 §5.7).
        await evaluate_wakes(tx, tenant, stream_url, [tick_event])
        # From the due time, or from now when that is long past (one catch-up tick, not
        # every missed one).
        now = datetime.now(UTC)
        next_at = cron.next_fire_at(parsed, timezone, max(task.fire_at, now))
        if next_at is not None:
            await store.insert_next_cron_tick(tx.conn, tenant, task, next_at)
        await store.complete_task(tx.conn, task.id)

    # --- failures -----------------------------------------------------------------------------

    async def _record_failure(self, task: store.ScheduledTask, failure: Exception) -> None:
        permanent = (
            isinstance(failure, ApiError)
            and 400 <= failure.status < 500
            and failure.code not in TRANSIENT_CODES
        )
        if isinstance(failure, ApiError):
            reason = f"{failure.status} {failure.code}: {failure}"
        else:
            reason = f"{type(failure).__name__}: {failure}"
        async with self.runtime.engine.transaction() as tx:
            current = await store.lock_task(tx.conn, task.id)
            if current is None:
                return  # completed by another process meanwhile
            if not permanent and current.attempt_count + 1 >= MAX_ATTEMPTS:
                permanent = True
                reason = f"gave up after {MAX_ATTEMPTS} attempts: {reason}"
            if permanent:
                log.warning(
                    "scheduled task %d (%s) failed for good: %s", task.id, task.kind, reason
                )
                manifest = task.payload.get("manifest")
                if task.kind == "delayed_send" and isinstance(manifest, dict):
                    await self._settle_future_send(tx, manifest, "failed", reason)
                await store.complete_task(tx.conn, task.id, reason)
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**current.attempt_count)
            log.warning(
                "scheduled task %d (%s) failed (attempt %d), retrying in %.0f s: %s",
                task.id,
                task.kind,
                current.attempt_count + 1,
                delay,
                reason,
            )
            await store.retry_task_later(tx.conn, task.id, reason, delay)


async def ensure_cron_chain(
    tx: StreamTransaction, tenant: str, expression: str, timezone: str
) -> str:
    """getOrCreateCronStream: the cron stream exists and its chain has a pending tick;
    returns the stream URL. Runs in the caller's transaction."""
    zone = cron.canonical_timezone(timezone)
    parsed = cron.parse_cron(expression)
    first = cron.next_fire_at(parsed, zone, datetime.now(UTC))
    if first is None:
        raise cron.invalid_expression(expression)
    # The chain lock before the stream's row lock: a firing tick takes them in this order.
    await store.lock_cron_chain(tx.conn, tenant, expression, zone)
    stream_url = cron.cron_stream_url(expression, zone)
    path = events.stream_path(stream_url)
    try:
        await tx.create(CreateSpec(path, events.JSON_CONTENT_TYPE))
    except ApiError as error:
        # Created concurrently (by another register) or by hand with other settings: the
        # stream is there either way, and ticks append to it as long as it takes JSON.
        if error.status != 409:
            raise
    await store.ensure_cron_tick(tx.conn, tenant, expression, zone, first, now_ms())
    return stream_url

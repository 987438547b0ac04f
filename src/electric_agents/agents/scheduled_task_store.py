"""SQL for `scheduled_tasks` (spec/03 §1.2, §5.7, §5.8; migration 0008 adds `retry_at`).

A due task is taken with `FOR UPDATE SKIP LOCKED` inside the transaction that executes it
and marks it complete, so the row lock is the claim: `claimed_by`/`claimed_at` stay unused,
and a crash rolls the execution and the completion back together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from electric_agents.agents import cron

# Rows are never deleted (spec/03 §1.2): completed ones stay as the record of what fired.
_TASK_COLUMNS = (
    "id, kind, payload, fire_at, cron_expression, cron_timezone, cron_tick_number, "
    "owner_entity_url, manifest_key, attempt_count"
)


@dataclass(frozen=True)
class ScheduledTask:
    id: int
    kind: str  # delayed_send | cron_tick | event_source_expiry
    payload: dict[str, Any]
    fire_at: datetime
    cron_expression: str | None
    cron_timezone: str | None
    cron_tick_number: int | None
    owner_entity_url: str | None
    manifest_key: str | None
    attempt_count: int


def _task(record: asyncpg.Record) -> ScheduledTask:
    payload = record["payload"]
    return ScheduledTask(
        id=record["id"],
        kind=record["kind"],
        payload=orjson.loads(payload) if isinstance(payload, str | bytes) else payload,
        fire_at=record["fire_at"],
        cron_expression=record["cron_expression"],
        cron_timezone=record["cron_timezone"],
        cron_tick_number=record["cron_tick_number"],
        owner_entity_url=record["owner_entity_url"],
        manifest_key=record["manifest_key"],
        attempt_count=record["attempt_count"],
    )


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def insert_delayed_send(
    conn: asyncpg.Connection,
    tenant: str,
    payload: dict[str, Any],
    fire_at: datetime,
    *,
    owner_entity_url: str | None = None,
    manifest_key: str | None = None,
) -> int:
    return await conn.fetchval(
        """
        INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at, owner_entity_url,
                                     manifest_key)
        VALUES ($1, 'delayed_send', $2::jsonb, $3, $4, $5)
        RETURNING id
        """,
        tenant,
        _json(payload),
        fire_at,
        owner_entity_url,
        manifest_key,
    )


async def cancel_manifest_sends(
    conn: asyncpg.Connection, tenant: str, owner_entity_url: str, manifest_key: str
) -> int:
    """Complete every pending delayed send of a schedule (superseded or deleted). A task
    being fired right now holds its row lock, so this waits for it and then skips it."""
    done = await conn.fetchval(
        """
        WITH cancelled AS (
            UPDATE scheduled_tasks SET completed_at = now(), claimed_by = NULL,
                                       claimed_at = NULL
            WHERE tenant_id = $1 AND kind = 'delayed_send' AND owner_entity_url = $2
              AND manifest_key = $3 AND completed_at IS NULL
            RETURNING 1
        )
        SELECT count(*) FROM cancelled
        """,
        tenant,
        owner_entity_url,
        manifest_key,
    )
    return int(done or 0)


async def insert_event_source_expiry(
    conn: asyncpg.Connection,
    tenant: str,
    owner_entity_url: str,
    manifest_key: str,
    fire_at: datetime,
    txid: str,
) -> int:
    """The end of an `expires_at` event-source subscription; `txid` names the upsert it
    belongs to, so a late firing never removes a newer subscription under the same key."""
    return await conn.fetchval(
        """
        INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at, owner_entity_url,
                                     manifest_key)
        VALUES ($1, 'event_source_expiry', $2::jsonb, $3, $4, $5)
        RETURNING id
        """,
        tenant,
        _json({"txid": txid}),
        fire_at,
        owner_entity_url,
        manifest_key,
    )


async def has_event_source_expiry(
    conn: asyncpg.Connection,
    tenant: str,
    owner_entity_url: str,
    manifest_key: str,
    fire_at: datetime,
) -> bool:
    """Whether the subscription already has a pending expiry at exactly `fire_at`."""
    found = await conn.fetchval(
        """
        SELECT 1 FROM scheduled_tasks
        WHERE tenant_id = $1 AND kind = 'event_source_expiry' AND owner_entity_url = $2
          AND manifest_key = $3 AND completed_at IS NULL AND fire_at = $4
        LIMIT 1
        """,
        tenant,
        owner_entity_url,
        manifest_key,
        fire_at,
    )
    return found is not None


async def cancel_event_source_expiry(
    conn: asyncpg.Connection, tenant: str, owner_entity_url: str, manifest_key: str
) -> int:
    """Complete the pending expiry of a subscription (replaced or deleted)."""
    done = await conn.fetchval(
        """
        WITH cancelled AS (
            UPDATE scheduled_tasks SET completed_at = now()
            WHERE tenant_id = $1 AND kind = 'event_source_expiry' AND owner_entity_url = $2
              AND manifest_key = $3 AND completed_at IS NULL
            RETURNING 1
        )
        SELECT count(*) FROM cancelled
        """,
        tenant,
        owner_entity_url,
        manifest_key,
    )
    return int(done or 0)


async def ensure_cron_tick(
    conn: asyncpg.Connection,
    tenant: str,
    expression: str,
    timezone: str,
    first_fire_at: datetime,
    registered_at_ms: int,
) -> None:
    """Make sure the (expression, timezone) chain has a pending tick, and note that someone
    asked for it now (a chain nobody watches ends once this is old, see scheduler.py). The
    caller holds `lock_cron_chain`.

    Tick 0 is inserted once ever (uq_cron_tick); a chain that ended (no watchers, or a
    permanent failure) restarts with the next tick number, which the reference could not
    do because tick 0 always conflicted. A tick being fired right now is skipped, not waited
    for (the scheduler takes the chain lock after the tick's row lock): the tick inserted
    here is the one the firing tick would have inserted, which then conflicts away."""
    stream_url = cron.cron_stream_url(expression, timezone)
    payload = _json({"streamPath": stream_url, "registeredAtMs": registered_at_ms})
    refreshed = await conn.fetchval(
        """
        UPDATE scheduled_tasks
        SET payload = payload || jsonb_build_object('registeredAtMs', $4::bigint)
        WHERE id IN (
            SELECT id FROM scheduled_tasks
            WHERE tenant_id = $1 AND kind = 'cron_tick' AND cron_expression = $2
              AND cron_timezone = $3 AND completed_at IS NULL
            FOR UPDATE SKIP LOCKED
        )
        RETURNING id
        """,
        tenant,
        expression,
        timezone,
        registered_at_ms,
    )
    if refreshed is not None:
        return
    await conn.execute(
        """
        INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at, cron_expression,
                                     cron_timezone, cron_tick_number)
        SELECT $1, 'cron_tick', $2::jsonb, $3, $4, $5,
               coalesce(max(cron_tick_number) + 1, 0)
        FROM scheduled_tasks
        WHERE tenant_id = $1 AND kind = 'cron_tick' AND cron_expression = $4
          AND cron_timezone = $5
        ON CONFLICT ON CONSTRAINT uq_cron_tick DO NOTHING
        """,
        tenant,
        payload,
        first_fire_at,
        expression,
        timezone,
    )


async def lock_cron_chain(
    conn: asyncpg.Connection, tenant: str, expression: str, timezone: str
) -> None:
    """Serialise a chain's restart with its ticks firing, so a chain never runs twice."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"cron-chain\x1f{tenant}\x1f{expression}\x1f{timezone}",
    )


async def insert_next_cron_tick(
    conn: asyncpg.Connection, tenant: str, task: ScheduledTask, fire_at: datetime
) -> None:
    assert task.cron_tick_number is not None
    await conn.execute(
        """
        INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at, cron_expression,
                                     cron_timezone, cron_tick_number)
        VALUES ($1, 'cron_tick', $2::jsonb, $3, $4, $5, $6)
        ON CONFLICT ON CONSTRAINT uq_cron_tick DO NOTHING
        """,
        tenant,
        _json(task.payload),
        fire_at,
        task.cron_expression,
        task.cron_timezone,
        task.cron_tick_number + 1,
    )


async def claim_due_task(conn: asyncpg.Connection, tenant: str) -> ScheduledTask | None:
    """The oldest due task no other transaction holds, locked until the caller commits."""
    record = await conn.fetchrow(
        f"""
        SELECT {_TASK_COLUMNS} FROM scheduled_tasks
        WHERE tenant_id = $1 AND completed_at IS NULL AND claimed_at IS NULL
          AND fire_at <= clock_timestamp()
          AND (retry_at IS NULL OR retry_at <= clock_timestamp())
        ORDER BY fire_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
        """,
        tenant,
    )
    return None if record is None else _task(record)


async def lock_task(conn: asyncpg.Connection, task_id: int) -> ScheduledTask | None:
    """Lock a task again (after its execution rolled back) to record the outcome; None
    when another process completed it meanwhile."""
    record = await conn.fetchrow(
        f"""
        SELECT {_TASK_COLUMNS} FROM scheduled_tasks
        WHERE id = $1 AND completed_at IS NULL
        FOR UPDATE
        """,
        task_id,
    )
    return None if record is None else _task(record)


async def complete_task(conn: asyncpg.Connection, task_id: int, error: str | None = None) -> None:
    await conn.execute(
        """
        UPDATE scheduled_tasks
        SET completed_at = now(), last_error = $2, attempt_count = attempt_count + 1
        WHERE id = $1
        """,
        task_id,
        error,
    )


async def retry_task_later(
    conn: asyncpg.Connection, task_id: int, error: str, delay_s: float
) -> None:
    await conn.execute(
        """
        UPDATE scheduled_tasks
        SET last_error = $2, attempt_count = attempt_count + 1,
            retry_at = clock_timestamp() + make_interval(secs => $3::float8)
        WHERE id = $1
        """,
        task_id,
        error,
        delay_s,
    )


async def seconds_until_next_due(conn: asyncpg.Connection, tenant: str) -> float | None:
    """How long until the earliest pending task is due (<= 0: now); None when none is."""
    value = await conn.fetchval(
        """
        SELECT extract(epoch FROM min(greatest(fire_at, coalesce(retry_at, fire_at)))
                                  - clock_timestamp())
        FROM scheduled_tasks
        WHERE tenant_id = $1 AND completed_at IS NULL AND claimed_at IS NULL
        """,
        tenant,
    )
    return None if value is None else float(value)


async def has_cron_watchers(conn: asyncpg.Connection, tenant: str, stream_url: str) -> bool:
    """Whether any wake registration watches the cron stream (its source URL)."""
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM wake_registrations"
            " WHERE tenant_id = $1 AND source_url = $2)",
            tenant,
            stream_url,
        )
    )


async def watched_cron_streams(conn: asyncpg.Connection, tenant: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT source_url FROM wake_registrations"
        " WHERE tenant_id = $1 AND source_url LIKE '/\\_cron/%'",
        tenant,
    )
    return [row["source_url"] for row in rows]

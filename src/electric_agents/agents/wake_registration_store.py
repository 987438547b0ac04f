"""SQL for `wake_registrations` and `wake_debounce_buffers` (spec/03 §1.2, §4; migration
0009).

Every function takes a connection, so a registration, the evaluation of a source event and
the wake it delivers commit in the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from electric_agents.db.jsonb import from_jsonb, to_jsonb
from electric_agents.errors import ApiError


@dataclass(frozen=True)
class WakeSpec:
    """What a registration asks for (spawn `wake`, `POST /_electric/wake`, manifests)."""

    subscriber_url: str
    source_url: str
    condition: Any  # "runFinished" or {"on": "change", "collections"?, "ops"?}
    debounce_ms: int = 0
    timeout_ms: int = 0
    one_shot: bool = False
    include_response: bool = True
    manifest_key: str | None = None


@dataclass(frozen=True)
class WakeRow:
    id: int
    subscriber_url: str
    source_url: str
    condition: Any
    debounce_ms: int
    timeout_ms: int
    one_shot: bool
    timeout_consumed: bool
    include_response: bool
    manifest_key: str | None
    created_at: datetime


@dataclass(frozen=True)
class DebounceBuffer:
    registration: WakeRow
    changes: list[dict[str, Any]]
    run_finished_status: str | None


_COLUMNS = (
    "id, subscriber_url, source_url, condition, debounce_ms, timeout_ms, one_shot,"
    " timeout_consumed, include_response, manifest_key, created_at"
)


def _row(record: asyncpg.Record) -> WakeRow:
    return WakeRow(
        id=record["id"],
        subscriber_url=record["subscriber_url"],
        source_url=record["source_url"],
        condition=from_jsonb(record["condition"]),
        debounce_ms=record["debounce_ms"],
        timeout_ms=record["timeout_ms"],
        one_shot=record["one_shot"],
        timeout_consumed=record["timeout_consumed"],
        include_response=record["include_response"],
        manifest_key=record["manifest_key"],
        created_at=record["created_at"],
    )


# --- registering ---------------------------------------------------------------------------


async def upsert_registration(conn: asyncpg.Connection, tenant: str, spec: WakeSpec) -> bool:
    """Register `spec`; True if a row was inserted. Keeps one registration per
    (subscriber, manifest key): a different one under the same key is replaced (with its
    pending debounce), an identical one is kept as it is, with its timeout clock
    (spec/03 §3.6.3, §4.13). Unkeyed duplicates collapse on the unique key (migration 0009)."""
    condition = to_jsonb(spec.condition)
    if spec.manifest_key is not None:
        await conn.execute(
            """
            DELETE FROM wake_registrations
            WHERE tenant_id = $1 AND subscriber_url = $2 AND manifest_key = $3
              AND (source_url, condition, debounce_ms, timeout_ms, one_shot, include_response)
                  IS DISTINCT FROM ($4, $5::jsonb, $6, $7, $8, $9)
            """,
            tenant,
            spec.subscriber_url,
            spec.manifest_key,
            spec.source_url,
            condition,
            spec.debounce_ms,
            spec.timeout_ms,
            spec.one_shot,
            spec.include_response,
        )
    try:
        async with conn.transaction():  # a savepoint: the caller's transaction survives
            inserted = await _insert_registration(conn, tenant, spec, condition)
    except asyncpg.ProgramLimitExceededError:
        # Urls, key and condition together exceed an index row (about 2.7 kB).
        raise ApiError(400, "INVALID_REQUEST", "Wake registration is too large") from None
    return inserted is not None


async def _insert_registration(
    conn: asyncpg.Connection, tenant: str, spec: WakeSpec, condition: str | None
) -> int | None:
    inserted: int | None = await conn.fetchval(
        """
        INSERT INTO wake_registrations (
            tenant_id, subscriber_url, source_url, condition, debounce_ms, timeout_ms,
            one_shot, include_response, manifest_key, created_at
        )
        VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, clock_timestamp())
        ON CONFLICT DO NOTHING
        RETURNING id
        """,
        tenant,
        spec.subscriber_url,
        spec.source_url,
        condition,
        spec.debounce_ms,
        spec.timeout_ms,
        spec.one_shot,
        spec.include_response,
        spec.manifest_key,
    )
    return inserted


async def has_registrations(conn: asyncpg.Connection, tenant: str, source_url: str) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM wake_registrations WHERE tenant_id = $1 AND source_url = $2 LIMIT 1",
        tenant,
        source_url,
    )
    return found is not None


async def registrations_for_source(
    conn: asyncpg.Connection, tenant: str, source_url: str, *, for_update: bool = False
) -> list[WakeRow]:
    """The source's registrations in id order (the reference's cache order). With
    `for_update` they are locked against the deadline worker and concurrent evaluations."""
    lock = " FOR UPDATE" if for_update else ""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM wake_registrations"
        f" WHERE tenant_id = $1 AND source_url = $2 ORDER BY id{lock}",
        tenant,
        source_url,
    )
    return [_row(row) for row in rows]


async def list_registrations(conn: asyncpg.Connection, tenant: str) -> list[WakeRow]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM wake_registrations WHERE tenant_id = $1 ORDER BY id", tenant
    )
    return [_row(row) for row in rows]


# --- evaluation side effects ---------------------------------------------------------------


async def consume_timeout(conn: asyncpg.Connection, registration_id: int) -> None:
    """A match (or the timeout itself) ends the registration's timeout for good."""
    await conn.execute(
        "UPDATE wake_registrations SET timeout_consumed = true WHERE id = $1", registration_id
    )


async def delete_registration(conn: asyncpg.Connection, registration_id: int) -> None:
    await conn.execute("DELETE FROM wake_registrations WHERE id = $1", registration_id)


async def buffer_change(
    conn: asyncpg.Connection,
    tenant: str,
    registration: WakeRow,
    change: dict[str, Any],
    run_finished_status: str | None,
) -> None:
    """Add a debounced match to the registration's buffer and push its delivery out to
    `debounceMs` from now (trailing edge, spec/03 §4.6); the latest run status wins."""
    await conn.execute(
        """
        INSERT INTO wake_debounce_buffers (
            registration_id, tenant_id, changes, run_finished_status, fire_at
        )
        VALUES ($1, $2, jsonb_build_array($3::jsonb), $4,
                clock_timestamp() + $5 * interval '1 millisecond')
        ON CONFLICT (registration_id) DO UPDATE SET
            changes = wake_debounce_buffers.changes || EXCLUDED.changes,
            run_finished_status = COALESCE(
                EXCLUDED.run_finished_status, wake_debounce_buffers.run_finished_status
            ),
            fire_at = EXCLUDED.fire_at
        """,
        registration.id,
        tenant,
        to_jsonb(change),
        run_finished_status,
        registration.debounce_ms,
    )


# --- deadlines (the worker's claims) -------------------------------------------------------


async def claim_due_debounce(conn: asyncpg.Connection, tenant: str) -> DebounceBuffer | None:
    """Lock and remove one buffer whose time has come, skipping those another worker (or
    an evaluation) holds; the caller delivers it in the same transaction."""
    record = await conn.fetchrow(
        """
        SELECT registration_id FROM wake_debounce_buffers
        WHERE tenant_id = $1 AND fire_at <= clock_timestamp()
        ORDER BY fire_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
        """,
        tenant,
    )
    if record is None:
        return None
    registration_id = record["registration_id"]
    registration = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM wake_registrations WHERE id = $1 FOR UPDATE SKIP LOCKED",
        registration_id,
    )
    if registration is None:
        return None  # being evaluated right now; the next round picks it up
    buffer = await conn.fetchrow(
        "DELETE FROM wake_debounce_buffers WHERE registration_id = $1"
        " RETURNING changes, run_finished_status",
        registration_id,
    )
    return DebounceBuffer(
        registration=_row(registration),
        changes=from_jsonb(buffer["changes"]),
        run_finished_status=buffer["run_finished_status"],
    )


async def claim_due_timeout(conn: asyncpg.Connection, tenant: str) -> WakeRow | None:
    """Lock one registration whose timeout is due and not consumed (spec/03 §4.7)."""
    record = await conn.fetchrow(
        f"""
        SELECT {_COLUMNS} FROM wake_registrations
        WHERE tenant_id = $1 AND timeout_ms > 0 AND NOT timeout_consumed
          AND created_at + timeout_ms * interval '1 millisecond' <= clock_timestamp()
        ORDER BY created_at
        LIMIT 1
        FOR UPDATE SKIP LOCKED
        """,
        tenant,
    )
    return _row(record) if record is not None else None


async def seconds_to_next_deadline(conn: asyncpg.Connection, tenant: str) -> float | None:
    """Seconds until the earliest pending debounce or timeout (<= 0: due), None if none."""
    value = await conn.fetchval(
        """
        SELECT EXTRACT(EPOCH FROM (least(
            (SELECT min(fire_at) FROM wake_debounce_buffers WHERE tenant_id = $1),
            (SELECT min(created_at + timeout_ms * interval '1 millisecond')
             FROM wake_registrations
             WHERE tenant_id = $1 AND timeout_ms > 0 AND NOT timeout_consumed)
        ) - clock_timestamp()))
        """,
        tenant,
    )
    return float(value) if value is not None else None


# --- unregistering (spec/03 §4.12) ---------------------------------------------------------


async def delete_by_manifest_key(
    conn: asyncpg.Connection, tenant: str, subscriber_url: str, manifest_key: str
) -> int:
    result = await conn.execute(
        "DELETE FROM wake_registrations"
        " WHERE tenant_id = $1 AND subscriber_url = $2 AND manifest_key = $3",
        tenant,
        subscriber_url,
        manifest_key,
    )
    return int(result.split()[-1])


async def delete_entity_wake_registrations(
    conn: asyncpg.Connection, tenant: str, entity_url: str
) -> int:
    """Delete every registration where the entity is the subscriber or the source (spec/03
    §2.6 step 3: a terminal entity neither wakes nor is watched); returns how many."""
    deleted = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM wake_registrations
            WHERE tenant_id = $1 AND (subscriber_url = $2 OR source_url = $2)
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        tenant,
        entity_url,
    )
    return int(deleted or 0)

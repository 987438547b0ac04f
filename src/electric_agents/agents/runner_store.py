"""SQL for the runner registry (spec/03 §1.2): `runners`, their heartbeat rows in
`runner_runtime_diagnostics`, and the read-only health inputs from `consumer_claims` and
`entity_dispatch_state`.

Every function takes a connection so callers can compose them into one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson


@dataclass
class Runner:
    id: str
    owner_principal: str
    label: str
    kind: str
    admin_status: str
    wake_stream: str
    created_at: datetime
    updated_at: datetime


@dataclass
class RunnerDiagnostics:
    """A runner's last heartbeat (absent until the first one)."""

    wake_stream_offset: str | None
    last_seen_at: datetime
    liveness_lease_expires_at: datetime
    diagnostics: dict[str, Any] | None


@dataclass
class ActiveClaim:
    consumer_id: str
    epoch: int
    entity_url: str
    stream_path: str
    claimed_at: datetime
    last_heartbeat_at: datetime | None
    lease_expires_at: datetime | None


@dataclass
class DispatchCounts:
    entities_with_active_claim: int
    entities_with_outstanding_wake: int
    entities_with_pending_work: int


_COLUMNS = "id, owner_principal, label, kind, admin_status, wake_stream, created_at, updated_at"


def _runner(row: asyncpg.Record) -> Runner:
    return Runner(**{key: row[key] for key in _COLUMNS.split(", ")})


async def get_runner(conn: asyncpg.Connection, tenant: str, runner_id: str) -> Runner | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM runners WHERE tenant_id = $1 AND id = $2", tenant, runner_id
    )
    return _runner(row) if row else None


async def list_runners(conn: asyncpg.Connection, tenant: str, owner: str) -> list[Runner]:
    rows = await conn.fetch(
        f"""
        SELECT {_COLUMNS} FROM runners WHERE tenant_id = $1 AND owner_principal = $2
        ORDER BY created_at DESC, id COLLATE "C"
        """,
        tenant,
        owner,
    )
    return [_runner(row) for row in rows]


async def upsert_runner(
    conn: asyncpg.Connection,
    tenant: str,
    *,
    runner_id: str,
    owner_principal: str,
    label: str,
    kind: str,
    admin_status: str,
    wake_stream: str,
) -> Runner | None:
    """Insert, or overwrite every field of a runner with the same owner (spec/03 §5.14).

    None when the id belongs to another owner: the reference let any caller re-register
    (and so take over) someone else's runner; here only the owner can."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO runners (tenant_id, id, owner_principal, label, kind, admin_status,
                             wake_stream)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (tenant_id, id) DO UPDATE SET
            label = EXCLUDED.label,
            kind = EXCLUDED.kind,
            admin_status = EXCLUDED.admin_status,
            wake_stream = EXCLUDED.wake_stream,
            updated_at = now()
        WHERE runners.owner_principal = EXCLUDED.owner_principal
        RETURNING {_COLUMNS}
        """,
        tenant,
        runner_id,
        owner_principal,
        label,
        kind,
        admin_status,
        wake_stream,
    )
    return _runner(row) if row else None


async def set_admin_status(
    conn: asyncpg.Connection, tenant: str, runner_id: str, admin_status: str
) -> Runner | None:
    row = await conn.fetchrow(
        f"""
        UPDATE runners SET admin_status = $3, updated_at = now()
        WHERE tenant_id = $1 AND id = $2
        RETURNING {_COLUMNS}
        """,
        tenant,
        runner_id,
        admin_status,
    )
    return _runner(row) if row else None


def _diagnostics(row: asyncpg.Record) -> RunnerDiagnostics:
    raw = row["diagnostics"]
    return RunnerDiagnostics(
        wake_stream_offset=row["wake_stream_offset"],
        last_seen_at=row["last_seen_at"],
        liveness_lease_expires_at=row["liveness_lease_expires_at"],
        diagnostics=orjson.loads(raw) if isinstance(raw, str | bytes) else raw,
    )


async def upsert_diagnostics(
    conn: asyncpg.Connection,
    tenant: str,
    runner: Runner,
    *,
    last_seen_at: datetime,
    lease_expires_at: datetime,
    wake_stream_offset: str | None,
    diagnostics: dict[str, Any] | None,
) -> RunnerDiagnostics:
    """Record a heartbeat; the offset and diagnostics keep their old values when not sent."""
    row = await conn.fetchrow(
        """
        INSERT INTO runner_runtime_diagnostics
            (tenant_id, runner_id, owner_principal, wake_stream_offset, last_seen_at,
             liveness_lease_expires_at, diagnostics)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
        ON CONFLICT (tenant_id, runner_id) DO UPDATE SET
            owner_principal = EXCLUDED.owner_principal,
            wake_stream_offset = COALESCE(EXCLUDED.wake_stream_offset,
                                          runner_runtime_diagnostics.wake_stream_offset),
            last_seen_at = EXCLUDED.last_seen_at,
            liveness_lease_expires_at = EXCLUDED.liveness_lease_expires_at,
            diagnostics = COALESCE(EXCLUDED.diagnostics, runner_runtime_diagnostics.diagnostics),
            updated_at = now()
        RETURNING wake_stream_offset, last_seen_at, liveness_lease_expires_at, diagnostics
        """,
        tenant,
        runner.id,
        runner.owner_principal,
        wake_stream_offset,
        last_seen_at,
        lease_expires_at,
        None if diagnostics is None else orjson.dumps(diagnostics).decode(),
    )
    return _diagnostics(row)


async def get_diagnostics(
    conn: asyncpg.Connection, tenant: str, runner_id: str
) -> RunnerDiagnostics | None:
    row = await conn.fetchrow(
        """
        SELECT wake_stream_offset, last_seen_at, liveness_lease_expires_at, diagnostics
        FROM runner_runtime_diagnostics WHERE tenant_id = $1 AND runner_id = $2
        """,
        tenant,
        runner_id,
    )
    return _diagnostics(row) if row else None


async def active_claims(conn: asyncpg.Connection, tenant: str, runner_id: str) -> list[ActiveClaim]:
    rows = await conn.fetch(
        """
        SELECT consumer_id, epoch, entity_url, stream_path, claimed_at, last_heartbeat_at,
               lease_expires_at
        FROM consumer_claims
        WHERE tenant_id = $1 AND runner_id = $2 AND status = 'active'
        ORDER BY claimed_at, consumer_id COLLATE "C"
        """,
        tenant,
        runner_id,
    )
    return [ActiveClaim(**dict(row)) for row in rows]


async def dispatch_counts(conn: asyncpg.Connection, tenant: str, runner_id: str) -> DispatchCounts:
    row = await conn.fetchrow(
        """
        SELECT
            count(*) FILTER (WHERE active_consumer_id IS NOT NULL) AS active,
            count(*) FILTER (WHERE outstanding_wake_id IS NOT NULL
                             AND active_consumer_id IS NULL) AS outstanding,
            count(*) FILTER (WHERE jsonb_typeof(pending_source_streams) = 'array'
                             AND jsonb_array_length(pending_source_streams) > 0) AS pending
        FROM entity_dispatch_state
        WHERE tenant_id = $1 AND active_runner_id = $2
        """,
        tenant,
        runner_id,
    )
    return DispatchCounts(
        entities_with_active_claim=row["active"],
        entities_with_outstanding_wake=row["outstanding"],
        entities_with_pending_work=row["pending"],
    )

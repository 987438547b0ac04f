"""SQL for the `entities` table and its per-entity dispatch row (spec/03 §1.2).

Every function takes a connection, so callers compose them into one transaction (spawn,
signals and sends each commit their row changes, stream writes and events together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from electric_agents.db.jsonb import from_jsonb, to_jsonb

TERMINAL_STATUSES = frozenset({"stopped", "killed"})
STATUSES = ("spawning", "running", "idle", "paused", "stopping", "stopped", "killed")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Entity:
    url: str
    type: str
    status: str = "idle"
    subscription_id: str = ""
    dispatch_policy: dict[str, Any] | None = None
    write_token: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    spawn_args: dict[str, Any] | None = None
    parent: str | None = None
    created_by: str | None = None
    type_revision: int | None = None
    inbox_schemas: dict[str, Any] | None = None
    state_schemas: dict[str, Any] | None = None
    created_at: int = 0
    updated_at: int = 0

    @property
    def main_stream(self) -> str:
        return f"{self.url}/main"

    @property
    def error_stream(self) -> str:
        return f"{self.url}/error"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def public(self) -> dict[str, Any]:
        """The wire projection, in the reference's key order (spec/02 §3.0). Never includes
        the write token, subscription id, type revision or schemas."""
        out: dict[str, Any] = {
            "url": self.url,
            "type": self.type,
            "status": self.status,
            "streams": {"main": self.main_stream, "error": self.error_stream},
        }
        if self.dispatch_policy is not None:
            out["dispatch_policy"] = self.dispatch_policy
        out["tags"] = self.tags
        out["spawn_args"] = self.spawn_args if self.spawn_args is not None else {}
        if self.parent is not None:
            out["parent"] = self.parent
        if self.created_by is not None:
            out["created_by"] = self.created_by
        out["created_at"] = self.created_at
        out["updated_at"] = self.updated_at
        return out


def tags_index(tags: dict[str, str]) -> list[str]:
    """One entry per tag, the JSON text of `[key, value]`, sorted (for the GIN index)."""
    return sorted(orjson.dumps([key, value]).decode() for key, value in tags.items())


def entity_from_row(row: asyncpg.Record) -> Entity:
    return Entity(
        url=row["url"],
        type=row["type"],
        status=row["status"],
        subscription_id=row["subscription_id"],
        dispatch_policy=from_jsonb(row["dispatch_policy"]),
        write_token=row["write_token"],
        tags=from_jsonb(row["tags"]) or {},
        spawn_args=from_jsonb(row["spawn_args"]),
        parent=row["parent"],
        created_by=row["created_by"],
        type_revision=row["type_revision"],
        inbox_schemas=from_jsonb(row["inbox_schemas"]),
        state_schemas=from_jsonb(row["state_schemas"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


ENTITY_COLUMNS = """
    url, type, status, subscription_id, dispatch_policy, write_token, tags, spawn_args,
    parent, created_by, type_revision, inbox_schemas, state_schemas, created_at, updated_at
"""


async def current_txid(conn: asyncpg.Connection) -> int:
    """The Postgres transaction id clients wait for in shape streams (spec/03 §6.2)."""
    txid: int = await conn.fetchval("SELECT pg_current_xact_id()::xid::text::bigint")
    return txid


async def insert_entity(conn: asyncpg.Connection, tenant: str, entity: Entity) -> bool:
    """Insert the entity row and its dispatch row; False if the URL is taken."""
    inserted = await conn.fetchval(
        f"""
        INSERT INTO entities (tenant_id, {ENTITY_COLUMNS}, tags_index)
        VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8::jsonb, $9::jsonb, $10, $11, $12,
                $13::jsonb, $14::jsonb, $15, $16, $17)
        ON CONFLICT (tenant_id, url) DO NOTHING
        RETURNING true
        """,
        tenant,
        entity.url,
        entity.type,
        entity.status,
        entity.subscription_id,
        to_jsonb(entity.dispatch_policy),
        entity.write_token,
        to_jsonb(entity.tags),
        to_jsonb(entity.spawn_args if entity.spawn_args is not None else {}),
        entity.parent,
        entity.created_by,
        entity.type_revision,
        to_jsonb(entity.inbox_schemas),
        to_jsonb(entity.state_schemas),
        entity.created_at,
        entity.updated_at,
        tags_index(entity.tags),
    )
    if not inserted:
        return False
    await conn.execute(
        """
        INSERT INTO entity_dispatch_state (tenant_id, entity_url) VALUES ($1, $2)
        ON CONFLICT DO NOTHING
        """,
        tenant,
        entity.url,
    )
    return True


async def get_entity(
    conn: asyncpg.Connection, tenant: str, url: str, *, for_update: bool = False
) -> Entity | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {ENTITY_COLUMNS} FROM entities WHERE tenant_id = $1 AND url = $2{lock}",
        tenant,
        url,
    )
    return entity_from_row(row) if row else None


async def lock_entity_nowait(conn: asyncpg.Connection, tenant: str, url: str) -> bool | None:
    """Take the entity's row lock without waiting: None if there is no such entity, False
    if another transaction holds it (for background work that must not wait on a request
    holding the lock, which may in turn wait on the work's own locks)."""
    try:
        async with conn.transaction():  # a savepoint: a refusal leaves the caller usable
            found = await conn.fetchval(
                "SELECT 1 FROM entities WHERE tenant_id = $1 AND url = $2 FOR UPDATE NOWAIT",
                tenant,
                url,
            )
    except asyncpg.LockNotAvailableError:
        return False
    return None if found is None else True


async def list_entities(
    conn: asyncpg.Connection,
    tenant: str,
    *,
    type_name: str | None = None,
    status: str | None = None,
    parent: str | None = None,
    created_by: str | None = None,
) -> list[Entity]:
    """Exact-match filters; newest first, as `GET /_electric/entities` lists them."""
    rows = await conn.fetch(
        f"""
        SELECT {ENTITY_COLUMNS} FROM entities
        WHERE tenant_id = $1
          AND ($2::text IS NULL OR type = $2)
          AND ($3::text IS NULL OR status = $3)
          AND ($4::text IS NULL OR parent = $4)
          AND ($5::text IS NULL OR created_by = $5)
        ORDER BY created_at DESC, url DESC
        """,
        tenant,
        type_name,
        status,
        parent,
        created_by,
    )
    return [entity_from_row(row) for row in rows]


async def set_status(conn: asyncpg.Connection, tenant: str, url: str, status: str) -> int:
    """Write a status (and bump updated_at); returns the txid of the change."""
    await conn.execute(
        "UPDATE entities SET status = $3, updated_at = $4 WHERE tenant_id = $1 AND url = $2",
        tenant,
        url,
        status,
        now_ms(),
    )
    return await current_txid(conn)


async def set_tags(conn: asyncpg.Connection, tenant: str, url: str, tags: dict[str, str]) -> int:
    """Store the tags key-sorted with their index (and bump updated_at); returns the new
    updated_at."""
    updated_at = now_ms()
    await conn.execute(
        """
        UPDATE entities SET tags = $3::jsonb, tags_index = $4, updated_at = $5
        WHERE tenant_id = $1 AND url = $2
        """,
        tenant,
        url,
        to_jsonb(dict(sorted(tags.items()))),
        tags_index(tags),
        updated_at,
    )
    return updated_at


async def set_dispatch_policy(
    conn: asyncpg.Connection, tenant: str, url: str, policy: dict[str, Any]
) -> int:
    """Store a dispatch policy (and bump updated_at); returns the new updated_at."""
    updated_at = now_ms()
    await conn.execute(
        """
        UPDATE entities SET dispatch_policy = $3::jsonb, updated_at = $4
        WHERE tenant_id = $1 AND url = $2
        """,
        tenant,
        url,
        to_jsonb(policy),
        updated_at,
    )
    return updated_at


async def delete_entity(conn: asyncpg.Connection, tenant: str, url: str) -> None:
    """Only for rolling back a failed spawn or fork; entities are never deleted otherwise."""
    await conn.execute("DELETE FROM entities WHERE tenant_id = $1 AND url = $2", tenant, url)

"""SQL for the `entity_types` table (spec/03 §1.2) and the `EntityType` row it holds.

Every function takes a connection so callers can compose them into one transaction.
Timestamps are ISO-8601 strings, as the reference stores them (the shape API serves them raw).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from electric_agents.db.jsonb import from_jsonb, to_jsonb


def now_iso() -> str:
    """JavaScript's `new Date().toISOString()`: UTC, milliseconds, `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class EntityType:
    name: str
    description: str
    creation_schema: dict[str, Any] | None = None
    inbox_schemas: dict[str, Any] | None = None
    state_schemas: dict[str, Any] | None = None
    serve_endpoint: str | None = None
    default_dispatch_policy: dict[str, Any] | None = None
    revision: int = 1
    created_at: str = ""
    updated_at: str = ""

    def public(self) -> dict[str, Any]:
        """PublicEntityType in the reference's key order (spec/02 §3.0): schema keys are
        always present (`null` when unset), `serve_endpoint` and `default_dispatch_policy`
        are omitted when unset, and the `input_schemas`/`output_schemas` aliases come last."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "creation_schema": self.creation_schema,
            "inbox_schemas": self.inbox_schemas,
            "state_schemas": self.state_schemas,
        }
        if self.serve_endpoint is not None:
            out["serve_endpoint"] = self.serve_endpoint
        if self.default_dispatch_policy is not None:
            out["default_dispatch_policy"] = self.default_dispatch_policy
        out["revision"] = self.revision
        out["created_at"] = self.created_at
        out["updated_at"] = self.updated_at
        out["input_schemas"] = self.inbox_schemas
        out["output_schemas"] = self.state_schemas
        return out


_COLUMNS = """
    name, description, creation_schema, inbox_schemas, state_schemas, serve_endpoint,
    default_dispatch_policy, revision, created_at, updated_at
"""


def _entity_type(row: asyncpg.Record) -> EntityType:
    return EntityType(
        name=row["name"],
        description=row["description"],
        creation_schema=from_jsonb(row["creation_schema"]),
        inbox_schemas=from_jsonb(row["inbox_schemas"]),
        state_schemas=from_jsonb(row["state_schemas"]),
        serve_endpoint=row["serve_endpoint"],
        default_dispatch_policy=from_jsonb(row["default_dispatch_policy"]),
        revision=row["revision"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def get_entity_type(
    conn: asyncpg.Connection, tenant: str, name: str, *, for_update: bool = False
) -> EntityType | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM entity_types WHERE tenant_id = $1 AND name = $2{lock}",
        tenant,
        name,
    )
    return _entity_type(row) if row else None


async def list_entity_types(conn: asyncpg.Connection, tenant: str) -> list[EntityType]:
    # COLLATE "C": byte order, the same on every database whatever its default collation.
    rows = await conn.fetch(
        f'SELECT {_COLUMNS} FROM entity_types WHERE tenant_id = $1 ORDER BY name COLLATE "C"',
        tenant,
    )
    return [_entity_type(row) for row in rows]


async def upsert_entity_type(
    conn: asyncpg.Connection, tenant: str, entity_type: EntityType
) -> EntityType:
    """Insert at revision 1, or overwrite every column of an existing row with
    `revision + 1`, keeping its `created_at` (spec/03 §5.1)."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO entity_types (tenant_id, {_COLUMNS})
        VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb, $7, $8::jsonb, 1, $9, $9)
        ON CONFLICT (tenant_id, name) DO UPDATE SET
            description = EXCLUDED.description,
            creation_schema = EXCLUDED.creation_schema,
            inbox_schemas = EXCLUDED.inbox_schemas,
            state_schemas = EXCLUDED.state_schemas,
            serve_endpoint = EXCLUDED.serve_endpoint,
            default_dispatch_policy = EXCLUDED.default_dispatch_policy,
            revision = entity_types.revision + 1,
            updated_at = EXCLUDED.updated_at
        RETURNING {_COLUMNS}
        """,
        tenant,
        entity_type.name,
        entity_type.description,
        to_jsonb(entity_type.creation_schema),
        to_jsonb(entity_type.inbox_schemas),
        to_jsonb(entity_type.state_schemas),
        entity_type.serve_endpoint,
        to_jsonb(entity_type.default_dispatch_policy),
        now_iso(),
    )
    return _entity_type(row)


async def insert_entity_type_if_absent(
    conn: asyncpg.Connection, tenant: str, entity_type: EntityType
) -> None:
    """Create the row at revision 1 unless the name exists (built-in types at startup)."""
    created_at = now_iso()
    await conn.execute(
        f"""
        INSERT INTO entity_types (tenant_id, {_COLUMNS})
        VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb, $7, $8::jsonb, 1, $9, $9)
        ON CONFLICT (tenant_id, name) DO NOTHING
        """,
        tenant,
        entity_type.name,
        entity_type.description,
        to_jsonb(entity_type.creation_schema),
        to_jsonb(entity_type.inbox_schemas),
        to_jsonb(entity_type.state_schemas),
        entity_type.serve_endpoint,
        to_jsonb(entity_type.default_dispatch_policy),
        created_at,
    )


async def replace_schema_maps(
    conn: asyncpg.Connection,
    tenant: str,
    name: str,
    *,
    inbox_schemas: dict[str, Any] | None,
    state_schemas: dict[str, Any] | None,
) -> EntityType | None:
    """Write the amended schema maps and bump the revision. Only these columns change: the
    reference rewrote the whole row and lost `default_dispatch_policy` (spec/03 §6.9 #4)."""
    row = await conn.fetchrow(
        f"""
        UPDATE entity_types SET
            inbox_schemas = $3::jsonb,
            state_schemas = $4::jsonb,
            revision = revision + 1,
            updated_at = $5
        WHERE tenant_id = $1 AND name = $2
        RETURNING {_COLUMNS}
        """,
        tenant,
        name,
        to_jsonb(inbox_schemas),
        to_jsonb(state_schemas),
        now_iso(),
    )
    return _entity_type(row) if row else None


async def delete_entity_type(conn: asyncpg.Connection, tenant: str, name: str) -> bool:
    """False when there was no such type. Entities of the type are left alone."""
    deleted = await conn.fetchval(
        "DELETE FROM entity_types WHERE tenant_id = $1 AND name = $2 RETURNING true",
        tenant,
        name,
    )
    return bool(deleted)

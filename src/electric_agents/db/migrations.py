"""Plain SQL migrations, applied in file-name order and tracked by name.

Tracking by name (not by timestamp) means a migration added between two older ones is still
applied on upgrade (the reference skips such a file). Each file runs in its own transaction;
a transaction-scoped advisory lock makes concurrent startups apply each file exactly once.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# An arbitrary constant that names "the migrations lock" among advisory locks.
MIGRATION_LOCK_KEY = 0x45_41_4D_49_47  # "EAMIG"


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("electric_agents.db") / "migrations"
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return files


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                name text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
    applied: list[str] = []
    for name, sql in migration_files():
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            done = await conn.fetchval("SELECT 1 FROM schema_migrations WHERE name = $1", name)
            if done:
                continue
            log.info("applying migration %s", name)
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
            applied.append(name)
    return applied

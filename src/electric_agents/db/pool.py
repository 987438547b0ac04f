"""The asyncpg connection pool and the database bootstrap (embedded or external)."""

from __future__ import annotations

import asyncpg

from electric_agents.db.migrations import apply_migrations


async def open_pool(database_url: str, *, min_size: int = 2, max_size: int = 20) -> asyncpg.Pool:
    """Open a pool on an up-to-date schema."""
    conn = await asyncpg.connect(database_url)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        # Statements are prepared per connection; keep the cache for the hot queries.
        statement_cache_size=256,
    )
    assert pool is not None
    return pool

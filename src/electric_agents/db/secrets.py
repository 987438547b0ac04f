"""Values that must survive restarts and be shared by every server process on one database,
such as signing keys, kept in the `server_secrets` table."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg


async def load_or_create_secret(pool: asyncpg.Pool, name: str, create: Callable[[], str]) -> str:
    """The stored value of `name`, storing `create()` first if there is none.

    Several processes starting at once may each create a candidate; the first insert wins and
    all of them return the stored one.
    """
    async with pool.acquire() as conn:
        stored: str | None = await conn.fetchval(
            "SELECT value FROM server_secrets WHERE name = $1", name
        )
        if stored is not None:
            return stored
        await conn.execute(
            """
            INSERT INTO server_secrets (name, value) VALUES ($1, $2)
            ON CONFLICT (name) DO NOTHING
            """,
            name,
            create(),
        )
        value: str = await conn.fetchval("SELECT value FROM server_secrets WHERE name = $1", name)
        return value

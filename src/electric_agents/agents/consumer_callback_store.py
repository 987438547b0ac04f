"""SQL for `consumer_callbacks` (spec/03 §1.2, §5.13): the DS callback behind each forwarded
wake. Only the lookup the run-finished shortcut needs lives here so far."""

from __future__ import annotations

import asyncpg


async def has_consumer_callback(conn: asyncpg.Connection, tenant: str, main_stream: str) -> bool:
    """Whether any wake of the entity whose main stream is `main_stream` went through the
    callback protocol (spec/03 §4.11: the run-finished shortcut is then disabled for good)."""
    # The path is matched with and without its leading slash: the reference stores the
    # entity form (`/chat/a1/main`), the stream engine names it without (`chat/a1/main`).
    bare = main_stream.lstrip("/")
    found = await conn.fetchval(
        """
        SELECT 1 FROM consumer_callbacks
        WHERE tenant_id = $1 AND primary_stream IN ($2, $3)
        LIMIT 1
        """,
        tenant,
        "/" + bare,
        bare,
    )
    return found is not None

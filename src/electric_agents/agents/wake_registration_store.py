"""SQL for `wake_registrations` (spec/03 §1.2, §4.1).

Only what the lifecycle needs so far: removing an entity's registrations when it becomes
terminal (spec/03 §4.12). Registering, matching and the rest belong to the wake system.
"""

from __future__ import annotations

import asyncpg


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

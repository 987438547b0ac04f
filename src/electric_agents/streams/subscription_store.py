"""SQL for subscriptions, their stream links and their wakes. Every statement on the
`ds_subscriptions` and `ds_subscription_links` tables lives here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from electric_agents.streams.subscriptions import (
    BEFORE_FIRST,
    StreamLink,
    Subscription,
    SubscriptionConfig,
    Wake,
    glob_match,
    literal_prefix,
)

SUBSCRIPTION_COLUMNS = """
    id, type, pattern, webhook_url, wake_stream, lease_ttl_ms, description, config_hash,
    created_at, status, generation, wake_id, wake_state, wake_path, wake_link_type,
    wake_acked_offset, wake_tail_offset, wake_holder, lease_expires_at, attempts,
    coalesce(lease_expires_at <= now(), false) AS lease_expired
"""

# A link is pending while its live stream's tail is past what was acknowledged. A
# subscription's own wake stream is never a source of its wakes (that would wake forever).
_PENDING_LINK = """
    JOIN ds_streams s ON s.path = l.path AND NOT s.soft_deleted
    WHERE s.tail > l.acked_offset AND l.path IS DISTINCT FROM sub.wake_stream
"""


@dataclass(frozen=True)
class PendingLink:
    path: str
    link_type: str
    acked_offset: int
    tail: int


def subscription_from_row(row: Any) -> Subscription:
    wake = None
    if row["wake_id"] is not None:
        wake = Wake(
            wake_id=row["wake_id"],
            generation=row["generation"],
            state=row["wake_state"],
            path=row["wake_path"],
            link_type=row["wake_link_type"],
            acked_offset=row["wake_acked_offset"],
            tail_offset=row["wake_tail_offset"],
            holder=row["wake_holder"],
            lease_expires_at=row["lease_expires_at"],
            lease_expired=row["lease_expired"],
        )
    return Subscription(
        id=row["id"],
        type=row["type"],
        pattern=row["pattern"],
        webhook_url=row["webhook_url"],
        wake_stream=row["wake_stream"],
        lease_ttl_ms=row["lease_ttl_ms"],
        description=row["description"],
        config_hash=row["config_hash"],
        created_at=row["created_at"],
        status=row["status"],
        generation=row["generation"],
        attempts=row["attempts"],
        wake=wake,
    )


# Subscriptions ---------------------------------------------------------------------------


async def insert_subscription(
    conn: asyncpg.Connection, subscription_id: str, config: SubscriptionConfig
) -> Subscription | None:
    """The new row, or None if the id is taken."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO ds_subscriptions (id, type, pattern, webhook_url, wake_stream,
                                      lease_ttl_ms, description, config_hash)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (id) DO NOTHING
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,
        subscription_id,
        config.type,
        config.pattern,
        config.webhook_url,
        config.wake_stream,
        config.lease_ttl_ms,
        config.description,
        config.config_hash(),
    )
    return subscription_from_row(row) if row else None


async def get_subscription(
    conn: asyncpg.Connection, subscription_id: str, *, for_update: bool = False
) -> Subscription | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {SUBSCRIPTION_COLUMNS} FROM ds_subscriptions WHERE id = $1{lock}",
        subscription_id,
    )
    return subscription_from_row(row) if row else None


async def move_wake_stream(conn: asyncpg.Connection, old_path: str, new_path: str) -> int:
    """Point every pull-wake subscription writing to `old_path` at `new_path` (a runner
    that registered again with another wake stream); returns how many moved."""
    moved = await conn.fetchval(
        """
        WITH moved AS (
            UPDATE ds_subscriptions SET wake_stream = $2
            WHERE type = 'pull-wake' AND wake_stream = $1
            RETURNING 1
        )
        SELECT count(*) FROM moved
        """,
        old_path,
        new_path,
    )
    return int(moved)


async def delete_subscription(conn: asyncpg.Connection, subscription_id: str) -> None:
    await conn.execute("DELETE FROM ds_subscriptions WHERE id = $1", subscription_id)


async def any_subscription_exists(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM ds_subscriptions)"))


async def pattern_subscriptions(
    conn: asyncpg.Connection, *, created_within_s: float | None = None
) -> list[tuple[str, str, str | None]]:
    """(id, pattern, wake stream) of pattern subscriptions, optionally only recent ones."""
    rows = await conn.fetch(
        """
        SELECT id, pattern, wake_stream FROM ds_subscriptions
        WHERE pattern IS NOT NULL
          AND ($1::float8 IS NULL OR created_at > now() - make_interval(secs => $1::float8))
        """,
        created_within_s,
    )
    return [(row["id"], row["pattern"], row["wake_stream"]) for row in rows]


# Links -----------------------------------------------------------------------------------


async def list_links(conn: asyncpg.Connection, subscription_id: str) -> list[StreamLink]:
    rows = await conn.fetch(
        """
        SELECT path, explicit, acked_offset FROM ds_subscription_links
        WHERE subscription_id = $1 ORDER BY path
        """,
        subscription_id,
    )
    return [
        StreamLink(row["path"], "explicit" if row["explicit"] else "glob", row["acked_offset"])
        for row in rows
    ]


async def link_explicit(conn: asyncpg.Connection, subscription_id: str, paths: list[str]) -> None:
    """Explicit links start at the stream's current tail (0 for a stream not created yet)."""
    await conn.execute(
        """
        INSERT INTO ds_subscription_links (subscription_id, path, explicit, acked_offset)
        SELECT $1, p.path, true,
               coalesce((SELECT s.tail FROM ds_streams s
                         WHERE s.path = p.path AND NOT s.soft_deleted), 0)
        FROM unnest($2::text[]) AS p(path)
        ON CONFLICT (subscription_id, path) DO UPDATE SET explicit = true
        """,
        subscription_id,
        paths,
    )


async def link_existing_matches(
    conn: asyncpg.Connection, subscription_id: str, pattern: str, wake_stream: str | None
) -> None:
    """Link the live streams matching `pattern` at their current tail (spec/01 §A.19)."""
    prefix = literal_prefix(pattern)
    like = _like_escape(prefix) + "/%" if prefix else "%"
    rows = await conn.fetch(
        """
        SELECT path, tail FROM ds_streams
        WHERE NOT soft_deleted AND (path = $1 OR path LIKE $2)
        """,
        prefix,
        like,
    )
    matches = [
        (row["path"], row["tail"])
        for row in rows
        if row["path"] != wake_stream and glob_match(pattern, row["path"])
    ]
    if not matches:
        return
    await conn.execute(
        """
        INSERT INTO ds_subscription_links (subscription_id, path, glob, acked_offset)
        SELECT $1, m.path, true, m.tail FROM unnest($2::text[], $3::bigint[]) AS m(path, tail)
        ON CONFLICT (subscription_id, path) DO UPDATE SET glob = true
        """,
        subscription_id,
        [path for path, _ in matches],
        [tail for _, tail in matches],
    )


async def link_created_streams(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> None:
    """Glob links for streams created after their subscription: all their content is
    pending (acknowledged offset -1). An existing link keeps its offset."""
    if not pairs:
        return
    await conn.execute(
        """
        INSERT INTO ds_subscription_links (subscription_id, path, glob, acked_offset)
        SELECT p.sid, p.path, true, $3 FROM unnest($1::text[], $2::text[]) AS p(sid, path)
        ON CONFLICT (subscription_id, path) DO UPDATE SET glob = true
        """,
        [sid for sid, _ in pairs],
        [path for _, path in pairs],
        BEFORE_FIRST,
    )


async def unlinked_streams_created_since_subscription(
    conn: asyncpg.Connection, subscription_id: str, pattern: str
) -> list[str]:
    """Streams created after the subscription (or just before: clocks and commit order
    differ) that match its glob and have no link yet."""
    prefix = literal_prefix(pattern)
    like = _like_escape(prefix) + "/%" if prefix else "%"
    rows = await conn.fetch(
        """
        SELECT s.path FROM ds_streams s, ds_subscriptions sub
        WHERE sub.id = $1 AND NOT s.soft_deleted
          AND s.created_at >= sub.created_at - interval '10 seconds'
          AND (s.path = $2 OR s.path LIKE $3)
          AND s.path IS DISTINCT FROM sub.wake_stream
          AND NOT EXISTS (SELECT 1 FROM ds_subscription_links l
                          WHERE l.subscription_id = sub.id AND l.path = s.path)
        """,
        subscription_id,
        prefix,
        like,
    )
    return [row["path"] for row in rows if glob_match(pattern, row["path"])]


async def unlink_explicit(conn: asyncpg.Connection, subscription_id: str, path: str) -> None:
    await conn.execute(
        """
        DELETE FROM ds_subscription_links
        WHERE subscription_id = $1 AND path = $2 AND NOT glob
        """,
        subscription_id,
        path,
    )
    await conn.execute(
        """
        UPDATE ds_subscription_links SET explicit = false
        WHERE subscription_id = $1 AND path = $2
        """,
        subscription_id,
        path,
    )


async def unlink_deleted_streams(conn: asyncpg.Connection, paths: list[str]) -> None:
    """Forget links to deleted streams, unless the path already holds a new live stream."""
    await conn.execute(
        """
        DELETE FROM ds_subscription_links l
        WHERE l.path = ANY($1::text[])
          AND NOT EXISTS (SELECT 1 FROM ds_streams s WHERE s.path = l.path AND NOT s.soft_deleted)
        """,
        paths,
    )


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# Pending work ----------------------------------------------------------------------------


async def idle_subscriptions_linked_to(conn: asyncpg.Connection, paths: list[str]) -> list[str]:
    """Subscriptions with no outstanding wake that link any of `paths`."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT l.subscription_id FROM ds_subscription_links l
        JOIN ds_subscriptions sub ON sub.id = l.subscription_id
        WHERE l.path = ANY($1::text[]) AND sub.wake_id IS NULL
        """,
        paths,
    )
    return [row["subscription_id"] for row in rows]


async def idle_subscriptions_with_pending_work(conn: asyncpg.Connection, limit: int) -> list[str]:
    rows = await conn.fetch(
        f"""
        SELECT DISTINCT sub.id FROM ds_subscriptions sub
        JOIN ds_subscription_links l ON l.subscription_id = sub.id
        {_PENDING_LINK} AND sub.wake_id IS NULL
        LIMIT $1
        """,
        limit,
    )
    return [row["id"] for row in rows]


async def next_pending_link(conn: asyncpg.Connection, subscription_id: str) -> PendingLink | None:
    """The pending stream named longest ago (never named first), for the next wake."""
    row = await conn.fetchrow(
        f"""
        SELECT l.path, l.explicit, l.acked_offset, s.tail
        FROM ds_subscription_links l JOIN ds_subscriptions sub ON sub.id = l.subscription_id
        {_PENDING_LINK} AND l.subscription_id = $1
        ORDER BY l.last_named_generation, l.path
        LIMIT 1
        """,
        subscription_id,
    )
    if row is None:
        return None
    link_type = "explicit" if row["explicit"] else "glob"
    return PendingLink(row["path"], link_type, row["acked_offset"], row["tail"])


async def link_offsets(
    conn: asyncpg.Connection, subscription_id: str, paths: list[str]
) -> dict[str, tuple[int, int | None]]:
    """For each linked path: (acknowledged offset, live stream tail or None)."""
    rows = await conn.fetch(
        """
        SELECT l.path, l.acked_offset, s.tail FROM ds_subscription_links l
        LEFT JOIN ds_streams s ON s.path = l.path AND NOT s.soft_deleted
        WHERE l.subscription_id = $1 AND l.path = ANY($2::text[])
        """,
        subscription_id,
        paths,
    )
    return {row["path"]: (row["acked_offset"], row["tail"]) for row in rows}


async def acknowledge(
    conn: asyncpg.Connection, subscription_id: str, path: str, offset: int
) -> None:
    """Acknowledgements only move forward."""
    await conn.execute(
        """
        UPDATE ds_subscription_links SET acked_offset = greatest(acked_offset, $3)
        WHERE subscription_id = $1 AND path = $2
        """,
        subscription_id,
        path,
        offset,
    )

"""SQL for stream metadata and message ranges. Every statement the engine runs lives here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from electric_agents.streams.json_mode import split_stored_values
from electric_agents.streams.model import Message, StreamMeta

_EXPIRED = """
    ((ttl_seconds IS NOT NULL AND last_access_at + make_interval(secs => ttl_seconds) <= now())
     OR (expires_at_ts IS NOT NULL AND expires_at_ts <= now()))
"""

_META_COLUMNS = f"""
    id, path, content_type, ttl_seconds, expires_at, tail, closed, closed_by_producer,
    closed_by_epoch, closed_by_seq, last_stream_seq, forked_from_path, fork_offset,
    fork_sub_offset, lineage_ids, lineage_bounds, ref_count, soft_deleted,
    {_EXPIRED} AS expired
"""

SELECT_META = f"SELECT {_META_COLUMNS} FROM ds_streams WHERE path = $1"
SELECT_META_FOR_UPDATE = SELECT_META + " FOR UPDATE"
SELECT_META_BY_ID_FOR_UPDATE = f"SELECT {_META_COLUMNS} FROM ds_streams WHERE id = $1 FOR UPDATE"
SELECT_METAS_FOR_UPDATE = (
    f"SELECT {_META_COLUMNS} FROM ds_streams WHERE path = ANY($1::text[]) ORDER BY id FOR UPDATE"
)

# Reads refresh a sliding TTL (spec/01 §A.17) in the same round trip as the lookup.
_SELECT_META_TOUCH = f"""
    WITH s AS (SELECT {_META_COLUMNS} FROM ds_streams WHERE path = $1),
    touched AS (
        UPDATE ds_streams SET last_access_at = now() FROM s
        WHERE ds_streams.id = s.id AND s.ttl_seconds IS NOT NULL
          AND NOT s.expired AND NOT s.soft_deleted
    )
    SELECT * FROM s
"""

# Rows and bytes one read returns at most; the first message is always returned whole.
READ_ROW_LIMIT = 4096
READ_BYTE_BUDGET = 4 * 1024 * 1024

_READ_OWN = """
    SELECT off, data FROM (
        SELECT off, data,
               sum(octet_length(data)) OVER (ORDER BY off ROWS UNBOUNDED PRECEDING)
                 - octet_length(data) AS before
        FROM ds_messages
        WHERE stream_id = $1 AND off > $2 AND off <= $3
        ORDER BY off LIMIT $4
    ) q WHERE before < $5 ORDER BY off
"""

_READ_LINEAGE = """
    SELECT off, data FROM (
        SELECT m.off, m.data,
               sum(octet_length(m.data)) OVER (ORDER BY m.off ROWS UNBOUNDED PRECEDING)
                 - octet_length(m.data) AS before
        FROM unnest($1::bigint[], $2::bigint[]) AS seg(sid, bound)
        JOIN ds_messages m ON m.stream_id = seg.sid AND m.off <= seg.bound
        WHERE m.off > $3 AND m.off <= $4
        ORDER BY m.off LIMIT $5
    ) q WHERE before < $6 ORDER BY off
"""


async def get_meta(
    conn: asyncpg.Connection, path: str, *, touch: bool = False
) -> StreamMeta | None:
    row = await conn.fetchrow(_SELECT_META_TOUCH if touch else SELECT_META, path)
    return StreamMeta.from_row(row) if row else None


async def get_metas(conn: asyncpg.Connection, paths: list[str]) -> dict[str, StreamMeta]:
    rows = await conn.fetch(
        f"SELECT {_META_COLUMNS} FROM ds_streams WHERE path = ANY($1::text[])", paths
    )
    return {row["path"]: StreamMeta.from_row(row) for row in rows}


async def lock_meta(conn: asyncpg.Connection, path: str) -> StreamMeta | None:
    row = await conn.fetchrow(SELECT_META_FOR_UPDATE, path)
    return StreamMeta.from_row(row) if row else None


async def lock_metas(conn: asyncpg.Connection, paths: list[str]) -> dict[str, StreamMeta]:
    rows = await conn.fetch(SELECT_METAS_FOR_UPDATE, paths)
    return {row["path"]: StreamMeta.from_row(row) for row in rows}


async def read_messages(
    conn: asyncpg.Connection,
    meta: StreamMeta,
    after: int,
    upto: int,
    *,
    row_limit: int = READ_ROW_LIMIT,
    byte_budget: int = READ_BYTE_BUDGET,
) -> list[Message]:
    """Messages with after < offset <= upto, through the fork chain, within the budget."""
    if meta.is_fork:
        ids, bounds = meta.read_segments()
        rows = await conn.fetch(_READ_LINEAGE, ids, bounds, after, upto, row_limit, byte_budget)
    else:
        rows = await conn.fetch(_READ_OWN, meta.id, after, upto, row_limit, byte_budget)
    return [Message(row["off"], row["data"]) for row in rows]


async def read_json_values(
    conn: asyncpg.Connection, meta: StreamMeta, *, mentioning: bytes | None = None
) -> list[Any]:
    """Every value of a JSON stream, through the fork chain, on `conn` (so inside the
    caller's transaction). With `mentioning`, only messages containing those bytes are
    parsed: a cheap pre-filter for readers that want one event type."""
    values: list[Any] = []
    after = 0
    while after < meta.tail:
        messages = await read_messages(conn, meta, after, meta.tail)
        if not messages:
            break
        for message in messages:
            if mentioning is None or mentioning in message.data:
                values.extend(split_stored_values(message.data))
        after = messages[-1].offset
    return values


async def first_message_after(
    conn: asyncpg.Connection, meta: StreamMeta, after: int
) -> Message | None:
    messages = await read_messages(conn, meta, after, meta.tail, row_limit=1)
    return messages[0] if messages else None


async def insert_stream(
    conn: asyncpg.Connection,
    *,
    path: str,
    content_type: str,
    ttl_seconds: int | None,
    expires_at: str | None,
    expires_at_ts: datetime | None,
    tail: int,
    forked_from: int | None = None,
    forked_from_path: str | None = None,
    fork_offset: int | None = None,
    fork_sub_offset: int = 0,
    lineage_ids: list[int] | None = None,
    lineage_bounds: list[int] | None = None,
) -> int | None:
    """Insert a stream row; None if another request created the path first."""
    stream_id: int | None = await conn.fetchval(
        """
        INSERT INTO ds_streams (path, content_type, ttl_seconds, expires_at, expires_at_ts,
            tail, forked_from, forked_from_path, fork_offset, fork_sub_offset,
            lineage_ids, lineage_bounds)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (path) DO NOTHING
        RETURNING id
        """,
        path,
        content_type,
        ttl_seconds,
        expires_at,
        expires_at_ts,
        tail,
        forked_from,
        forked_from_path,
        fork_offset,
        fork_sub_offset,
        lineage_ids or [],
        lineage_bounds or [],
    )
    return stream_id


async def insert_messages(
    conn: asyncpg.Connection, stream_ids: list[int], offsets: list[int], datas: list[bytes]
) -> None:
    if not stream_ids:
        return
    await conn.execute(
        """
        INSERT INTO ds_messages (stream_id, off, data)
        SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bytea[])
        """,
        stream_ids,
        offsets,
        datas,
    )


async def set_closed(conn: asyncpg.Connection, stream_id: int) -> None:
    await conn.execute("UPDATE ds_streams SET closed = true WHERE id = $1", stream_id)


async def increment_ref_count(conn: asyncpg.Connection, stream_id: int) -> None:
    await conn.execute("UPDATE ds_streams SET ref_count = ref_count + 1 WHERE id = $1", stream_id)


async def mark_soft_deleted(conn: asyncpg.Connection, stream_id: int) -> None:
    await conn.execute("UPDATE ds_streams SET soft_deleted = true WHERE id = $1", stream_id)


async def hard_delete(conn: asyncpg.Connection, stream_id: int) -> list[int]:
    """Remove a stream and its data; release its fork source, removing that too when the
    source is soft-deleted or expired and this was its last fork (spec/01 §A.8).

    Returns the ids removed.
    """
    removed: list[int] = []
    current: int | None = stream_id
    while current is not None:
        parent = await conn.fetchval(
            "DELETE FROM ds_streams WHERE id = $1 RETURNING forked_from", current
        )
        await conn.execute("DELETE FROM ds_messages WHERE stream_id = $1", current)
        await conn.execute("DELETE FROM ds_producers WHERE stream_id = $1", current)
        removed.append(current)
        current = None
        if parent is not None:
            row = await conn.fetchrow(
                f"""
                UPDATE ds_streams SET ref_count = ref_count - 1 WHERE id = $1
                RETURNING ref_count, soft_deleted, {_EXPIRED} AS expired
                """,
                parent,
            )
            if row and row["ref_count"] <= 0 and (row["soft_deleted"] or row["expired"]):
                current = parent
    return removed


async def lock_expired_unreferenced(conn: asyncpg.Connection, limit: int) -> list[tuple[int, str]]:
    """Expired streams no fork reads any more, locked for removal (skipping busy rows)."""
    rows = await conn.fetch(
        f"""
        SELECT id, path FROM ds_streams
        WHERE ref_count = 0 AND (soft_deleted OR {_EXPIRED})
        LIMIT $1 FOR UPDATE SKIP LOCKED
        """,
        limit,
    )
    return [(row["id"], row["path"]) for row in rows]


async def fetch_producers(
    conn: asyncpg.Connection, stream_ids: list[int], producer_ids: list[str]
) -> dict[tuple[int, str], tuple[int, int]]:
    rows = await conn.fetch(
        """
        SELECT p.stream_id, p.producer_id, p.epoch, p.last_seq
        FROM ds_producers p
        JOIN unnest($1::bigint[], $2::text[]) AS k(sid, pid)
          ON p.stream_id = k.sid AND p.producer_id = k.pid
        """,
        stream_ids,
        producer_ids,
    )
    return {(r["stream_id"], r["producer_id"]): (r["epoch"], r["last_seq"]) for r in rows}


async def notify(conn: asyncpg.Connection, channel: str, payload: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", channel, payload)

"""Create (including forks), delete and metadata of streams (spec/01 §A.4, §A.8, §A.9, §A.16)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from electric_agents.errors import ApiError
from electric_agents.streams import store
from electric_agents.streams.hub import CHANNEL, StreamHub
from electric_agents.streams.json_mode import (
    batch_from_values,
    parse_json_body,
    split_stored_values,
)
from electric_agents.streams.model import (
    DEFAULT_CONTENT_TYPE,
    Message,
    Presence,
    StreamMeta,
    is_json_type,
    is_valid_content_type,
    media_type,
)
from electric_agents.streams.offsets import MESSAGE_OVERHEAD


@dataclass(frozen=True)
class CreateSpec:
    """A validated PUT."""

    path: str
    content_type: str | None  # None when absent or not `type/subtype`
    ttl_seconds: int | None = None
    expires_at: str | None = None
    expires_at_ts: datetime | None = None
    closed: bool = False
    body: bytes = b""
    forked_from_path: str | None = None
    fork_offset: int | None = None
    fork_sub_offset: int | None = None


@dataclass(frozen=True)
class CreateResult:
    created: bool
    meta: StreamMeta


def parse_expires_at(raw: str) -> datetime:
    """An RFC 3339 timestamp (`Z` or `±hh:mm`); naive times are taken as UTC."""
    text = raw.strip()
    if not text or text[0] in "+-" or "T" not in text.upper():
        raise ApiError(400, "INVALID_EXPIRES_AT", "Stream-Expires-At must be an RFC 3339 timestamp")
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        # Normalising to UTC can leave the representable range at the calendar's edges.
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ApiError(
            400, "INVALID_EXPIRES_AT", "Stream-Expires-At must be an RFC 3339 timestamp"
        ) from None


async def create_stream(pool: asyncpg.Pool, hub: StreamHub, spec: CreateSpec) -> CreateResult:
    # A concurrent PUT of the same path can win the insert; then this one compares against it.
    for _ in range(5):
        async with pool.acquire() as conn, conn.transaction():
            result = await create_stream_in(conn, hub, spec)
        if result is not None:
            if result.created:
                hub.publish_created(spec.path)
            return result
    raise ApiError(409, "STREAM_CONFLICT", "Stream is being created concurrently")


async def create_stream_in(
    conn: asyncpg.Connection, hub: StreamHub, spec: CreateSpec
) -> CreateResult | None:
    """Create (or match) a stream inside the caller's transaction. None if a concurrent
    create of the same path won; the caller retries in a new transaction. The caller calls
    `hub.publish_created` after committing a creation."""
    existing = await store.lock_meta(conn, spec.path)
    if existing is not None:
        if existing.presence is Presence.GONE:
            raise ApiError(409, "STREAM_GONE", "Stream path is held by a deleted stream")
        if existing.presence is Presence.LIVE:
            _check_same_config(spec, existing)
            return CreateResult(False, existing)
        # Expired with no forks: the path is free again.
        await store.hard_delete(conn, existing.id)
        for payload in hub.notify_payloads([], [existing.path]):
            await store.notify(conn, CHANNEL, payload)
    meta = await _insert_new(conn, spec)
    if meta is None:
        return None
    for payload in hub.notify_payloads([], [], [spec.path]):
        await store.notify(conn, CHANNEL, payload)
    return CreateResult(True, meta)


def _check_same_config(spec: CreateSpec, existing: StreamMeta) -> None:
    """An existing stream matches a PUT only if every setting agrees (spec/01 §A.4)."""
    conflicts: list[str] = []
    if spec.content_type is not None or spec.forked_from_path is None:
        wanted = spec.content_type or DEFAULT_CONTENT_TYPE
        if media_type(wanted) != media_type(existing.content_type):
            conflicts.append("content type")
    inherits_expiry = spec.forked_from_path is not None and not (
        spec.ttl_seconds is not None or spec.expires_at is not None
    )
    if not inherits_expiry:
        if spec.ttl_seconds != existing.ttl_seconds:
            conflicts.append("TTL")
        if spec.expires_at != existing.expires_at:
            conflicts.append("Expires-At")
    if spec.closed != existing.closed:
        conflicts.append("closed state")
    if spec.forked_from_path != existing.forked_from_path:
        conflicts.append("fork source")
    if spec.fork_offset is not None and spec.fork_offset != existing.fork_offset:
        conflicts.append("fork offset")
    if (spec.fork_sub_offset or 0) != existing.fork_sub_offset:
        conflicts.append("fork sub-offset")
    if conflicts:
        raise ApiError(
            409,
            "STREAM_EXISTS",
            f"Stream already exists with a different {', '.join(conflicts)}",
        )


async def _insert_new(conn: asyncpg.Connection, spec: CreateSpec) -> StreamMeta | None:
    content_type = spec.content_type or DEFAULT_CONTENT_TYPE
    ttl_seconds, expires_at, expires_at_ts = spec.ttl_seconds, spec.expires_at, spec.expires_at_ts
    tail = 0
    first_messages: list[Message] = []
    source: StreamMeta | None = None
    fork_offset: int | None = None
    lineage_ids: list[int] = []
    lineage_bounds: list[int] = []
    if spec.forked_from_path is not None:
        source = await store.lock_meta(conn, spec.forked_from_path)
        if source is None or source.presence is Presence.MISSING:
            raise ApiError(404, "FORK_SOURCE_NOT_FOUND", "Fork source stream not found")
        if source.presence is Presence.GONE:
            raise ApiError(409, "FORK_SOURCE_GONE", "Fork source stream has been deleted")
        if spec.content_type is None:
            content_type = source.content_type
        elif media_type(spec.content_type) != media_type(source.content_type):
            raise ApiError(409, "CONTENT_TYPE_MISMATCH", "Fork content type differs from source")
        fork_offset = source.tail if spec.fork_offset is None else spec.fork_offset
        if fork_offset > source.tail:
            raise ApiError(400, "INVALID_FORK_OFFSET", "Fork offset is beyond the source's tail")
        if ttl_seconds is None and expires_at is None:
            ttl_seconds = source.ttl_seconds
            expires_at = source.expires_at
            expires_at_ts = parse_expires_at(expires_at) if expires_at else None
        lineage_ids = [*source.lineage_ids, source.id]
        lineage_bounds = [min(b, fork_offset) for b in source.lineage_bounds] + [fork_offset]
        tail = fork_offset
        if spec.fork_sub_offset:
            prefix = await _sub_offset_prefix(conn, source, fork_offset, spec.fork_sub_offset)
            first_messages.append(prefix)
            tail = prefix.offset
    elif spec.fork_offset is not None:
        raise ApiError(400, "INVALID_FORK", "Stream-Fork-Offset needs Stream-Forked-From")

    if spec.body:
        if is_json_type(content_type):
            batch = parse_json_body(spec.body, allow_empty_array=True)
            if batch.count:
                offset = tail + batch.size + MESSAGE_OVERHEAD
                first_messages.append(Message(offset, batch.encode(offset)))
                tail = offset
        else:
            tail += len(spec.body) + MESSAGE_OVERHEAD
            first_messages.append(Message(tail, spec.body))

    stream_id = await store.insert_stream(
        conn,
        path=spec.path,
        content_type=content_type,
        ttl_seconds=ttl_seconds,
        expires_at=expires_at,
        expires_at_ts=expires_at_ts,
        tail=tail,
        forked_from=source.id if source else None,
        forked_from_path=spec.forked_from_path,
        fork_offset=fork_offset,
        fork_sub_offset=spec.fork_sub_offset or 0,
        lineage_ids=lineage_ids,
        lineage_bounds=lineage_bounds,
    )
    if stream_id is None:
        return None
    await store.insert_messages(
        conn,
        [stream_id] * len(first_messages),
        [m.offset for m in first_messages],
        [m.data for m in first_messages],
    )
    if spec.closed:
        await store.set_closed(conn, stream_id)
    if source is not None:
        await store.increment_ref_count(conn, source.id)
    return await store.get_meta(conn, spec.path)


async def _sub_offset_prefix(
    conn: asyncpg.Connection, source: StreamMeta, fork_offset: int, sub_offset: int
) -> Message:
    """The first `sub_offset` values (JSON) or bytes of the source's next message (§A.16)."""
    following = await store.first_message_after(conn, source, fork_offset)
    if following is None:
        raise ApiError(400, "INVALID_FORK_SUB_OFFSET", "No message follows the fork offset")
    if source.is_json:
        values = split_stored_values(following.data)
        if sub_offset > len(values):
            raise ApiError(400, "INVALID_FORK_SUB_OFFSET", "Sub-offset beyond the message")
        batch = batch_from_values(values[:sub_offset])
        offset = fork_offset + batch.size + MESSAGE_OVERHEAD
        return Message(offset, batch.encode(offset))
    if sub_offset > len(following.data):
        raise ApiError(400, "INVALID_FORK_SUB_OFFSET", "Sub-offset beyond the message")
    return Message(fork_offset + sub_offset + MESSAGE_OVERHEAD, following.data[:sub_offset])


async def delete_stream(pool: asyncpg.Pool, hub: StreamHub, path: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        meta = require_live(await store.lock_meta(conn, path))
        if meta.ref_count > 0:
            # Forks still read its data: keep it, answer 410 from now on (spec/01 §A.8).
            await store.mark_soft_deleted(conn, meta.id)
        else:
            await store.hard_delete(conn, meta.id)
        for payload in hub.notify_payloads([], [path]):
            await store.notify(conn, CHANNEL, payload)
    hub.publish_deleted(path)


def require_live(meta: StreamMeta | None) -> StreamMeta:
    if meta is None or meta.presence is Presence.MISSING:
        raise ApiError(404, "STREAM_NOT_FOUND", "Stream not found")
    if meta.presence is Presence.GONE:
        raise ApiError(410, "STREAM_GONE", "Stream has been deleted")
    return meta


def validate_content_type(raw: str | None) -> str | None:
    return raw if raw is not None and is_valid_content_type(raw) else None


async def sweep_expired(pool: asyncpg.Pool, hub: StreamHub, *, limit: int = 500) -> int:
    """Remove expired streams that no fork reads. Expiry is enforced at request time
    anyway (spec/01 §A.17); this only gives the storage back."""
    async with pool.acquire() as conn, conn.transaction():
        doomed = await store.lock_expired_unreferenced(conn, limit)
        for stream_id, _ in doomed:
            await store.hard_delete(conn, stream_id)
        paths = [path for _, path in doomed]
        for payload in hub.notify_payloads([], paths):
            await store.notify(conn, CHANNEL, payload)
    for path in paths:
        hub.publish_deleted(path)
    return len(doomed)

"""Entity membership streams: `POST /_electric/entities/register` and `/_entities/<ref>`
(spec/02 §3.4, spec/03 §1.2, §3.5.9, §5.10; spec/04 §1.9).

The reference mirrors `entities` rows into these streams from an Electric shape, so without
Electric the route is a 500, and a crash between a row change and the shape can lose
updates until a resync. Here the registry feeds them directly: a trigger on `entities`
queues the URL of every changed row in `entity_membership_outbox` inside the changing
transaction, and `MembershipDrainer` diffs each queued entity against what every bridge
stream last said of it (`entity_bridge_members`), appending `members` events and updating
that record in one transaction. A crash rolls back both, so each change is written once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from electric_agents.agents import events
from electric_agents.agents.entity_store import tags_index
from electric_agents.agents.runtime import AgentsRuntime, drain_when_nudged
from electric_agents.agents.wakes import evaluate_wakes
from electric_agents.db.held import listening
from electric_agents.db.jsonb import from_jsonb
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.lifecycle import CreateSpec

log = logging.getLogger(__name__)

STREAM_PREFIX = "/_entities/"
NOTIFY_CHANNEL = "entity_membership_outbox"
POLL_INTERVAL_S = 1.0
ROWS_PER_TRANSACTION = 200
RECONCILE_CHUNK = 500
ERROR_PAUSE_S = 1.0
# spec/03 §5.10: a bridge nobody registered, read or referenced for 15 minutes is dropped
# (its stream stays); the check runs every 5 minutes.
STALE_AFTER_S = 15 * 60
GC_INTERVAL_S = 5 * 60
# GET/HEAD on a bridge stream refresh its activity at most this often per process.
TOUCH_INTERVAL_S = 30.0

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


# --- source refs -----------------------------------------------------------------------------


def _js_key_order(keys: Iterable[str]) -> list[str]:
    """Keys sorted as the reference's `Object.keys(tags).sort()` and then laid out by
    `JSON.stringify`: array-index keys first in numeric order, the rest in UTF-16 order."""

    def is_index(key: str) -> bool:
        return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0")

    ordered = sorted(keys, key=lambda key: key.encode("utf-16-be"))
    indexes = sorted((k for k in ordered if is_index(k) and int(k) < 2**32 - 1), key=int)
    index_set = set(indexes)
    return indexes + [key for key in ordered if key not in index_set]


def canonical_tags_json(tags: dict[str, str]) -> str:
    """`JSON.stringify` of the key-sorted tags (spec/04 §6.5: no spaces, non-ASCII as is)."""
    ordered = {key: tags[key] for key in _js_key_order(tags)}
    # For objects of strings orjson writes what JSON.stringify writes: no spaces, keys in
    # insertion order, non-ASCII as is, control characters as lowercase \\u escapes.
    return orjson.dumps(ordered).decode()


def fnv1a64_utf16(text: str) -> str:
    """FNV-1a 64 over UTF-16 code units (`charCodeAt`), as 16 lowercase hex digits."""
    value = _FNV_OFFSET
    data = text.encode("utf-16-le")
    for index in range(0, len(data), 2):
        value ^= data[index] | (data[index + 1] << 8)
        value = (value * _FNV_PRIME) & _MASK64
    return f"{value:016x}"


def source_ref(tags: dict[str, str]) -> str:
    return fnv1a64_utf16(canonical_tags_json(tags))


# --- member rows -------------------------------------------------------------------------------

_MEMBER_COLUMNS = """
    url, type, status, tags, tags_index, spawn_args, parent, type_revision, inbox_schemas,
    state_schemas, created_at, updated_at
"""


@dataclass(frozen=True)
class _Bridge:
    source_ref: str
    required: frozenset[str]  # the bridge's tags as `tags_index` entries

    @property
    def stream_path(self) -> str:
        return events.stream_path(STREAM_PREFIX + self.source_ref)


def member_row(record: asyncpg.Record) -> dict[str, Any]:
    """The `members` value (spec/03 §3.5.9), in the reference's column order."""
    return {
        "url": record["url"],
        "type": record["type"],
        "status": record["status"],
        "tags": from_jsonb(record["tags"]) or {},
        "spawn_args": from_jsonb(record["spawn_args"]) or {},
        "parent": record["parent"],
        "type_revision": record["type_revision"],
        "inbox_schemas": from_jsonb(record["inbox_schemas"]),
        "state_schemas": from_jsonb(record["state_schemas"]),
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }


def members_event(op: str, url: str, row: dict[str, Any]) -> dict[str, Any]:
    headers = {"operation": op, "timestamp": events.iso_timestamp(int(time.time() * 1000))}
    if op == "delete":
        return {"type": "members", "key": url, "old_value": row, "headers": headers}
    return {"type": "members", "key": url, "value": row, "headers": headers}


async def _lock_entities(conn: asyncpg.Connection, tenant: str, urls: list[str]) -> None:
    """Serialise reconciliations of the same entity across drainers and registrations; in
    sorted order so two lockers of overlapping sets cannot deadlock."""
    await conn.execute(
        """
        SELECT pg_advisory_xact_lock(hashtextextended('entity-member:' || $1 || ':' || u, 0))
        FROM unnest($2::text[]) AS u ORDER BY u
        """,
        tenant,
        sorted(set(urls)),
    )


async def reconcile(
    tx: StreamTransaction, tenant: str, urls: list[str], only_ref: str | None = None
) -> int:
    """Bring every bridge (or just `only_ref`) up to date for `urls`, whose entity locks the
    caller holds. Returns how many `members` events were appended."""
    conn = tx.conn
    bridge_rows = await conn.fetch(
        """
        SELECT source_ref, tags FROM entity_bridges
        WHERE tenant_id = $1 AND ($2::text IS NULL OR source_ref = $2)
        """,
        tenant,
        only_ref,
    )
    if not bridge_rows:
        return 0
    bridges = [
        _Bridge(row["source_ref"], frozenset(tags_index(from_jsonb(row["tags"]) or {})))
        for row in bridge_rows
    ]
    entity_rows = await conn.fetch(
        f"SELECT {_MEMBER_COLUMNS} FROM entities WHERE tenant_id = $1 AND url = ANY($2::text[])",
        tenant,
        urls,
    )
    entities = {row["url"]: row for row in entity_rows}
    current = {
        (row["source_ref"], row["entity_url"]): from_jsonb(row["member"])
        for row in await conn.fetch(
            """
            SELECT source_ref, entity_url, member FROM entity_bridge_members
            WHERE tenant_id = $1 AND entity_url = ANY($2::text[])
              AND ($3::text IS NULL OR source_ref = $3)
            """,
            tenant,
            urls,
            only_ref,
        )
    }
    appended = 0
    for bridge in bridges:
        changes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = []
        for url in urls:
            record = entities.get(url)
            wanted = None
            if record is not None and bridge.required <= set(record["tags_index"]):
                wanted = member_row(record)
            known = current.get((bridge.source_ref, url))
            if wanted == known:
                continue
            if wanted is None:
                assert known is not None
                event = members_event("delete", url, known)
            else:
                event = members_event("insert" if known is None else "update", url, wanted)
            changes.append((url, wanted, event))
        if changes and await _write(tx, tenant, bridge, changes):
            appended += len(changes)
    return appended


async def _write(
    tx: StreamTransaction,
    tenant: str,
    bridge: _Bridge,
    changes: list[tuple[str, dict[str, Any] | None, dict[str, Any]]],
) -> bool:
    """Append one bridge's events and record what its stream now says, both or neither. A
    stream someone deleted is recreated; one that refuses appends (closed) is skipped and
    logged rather than holding every other bridge back."""
    body = events.encode(*(event for _, _, event in changes))
    path = bridge.stream_path
    for attempt in range(2):
        try:
            async with tx.conn.transaction():  # a savepoint
                if attempt:
                    await tx.create(CreateSpec(path=path, content_type=events.JSON_CONTENT_TYPE))
                await tx.append(path, content_type=events.JSON_CONTENT_TYPE, body=body)
                # Observers of `entities({tags})` with a wake are woken in this transaction.
                await evaluate_wakes(
                    tx, tenant, STREAM_PREFIX + bridge.source_ref, [e for _, _, e in changes]
                )
                for url, wanted, _ in changes:
                    await _record_member(tx.conn, tenant, bridge.source_ref, url, wanted)
            return True
        except ApiError as error:
            if error.status == 404 and not attempt:
                continue
            log.warning("members stream %s refused an append: %s", path, error)
    return False


async def _record_member(
    conn: asyncpg.Connection, tenant: str, ref: str, url: str, row: dict[str, Any] | None
) -> None:
    if row is None:
        await conn.execute(
            """
            DELETE FROM entity_bridge_members
            WHERE tenant_id = $1 AND source_ref = $2 AND entity_url = $3
            """,
            tenant,
            ref,
            url,
        )
        return
    await conn.execute(
        """
        INSERT INTO entity_bridge_members (tenant_id, source_ref, entity_url, member)
        VALUES ($1, $2, $3, $4::jsonb)
        ON CONFLICT (tenant_id, source_ref, entity_url) DO UPDATE SET member = EXCLUDED.member
        """,
        tenant,
        ref,
        url,
        orjson.dumps(row).decode(),
    )


# --- registration ------------------------------------------------------------------------------


async def register(runtime: AgentsRuntime, tags: dict[str, str]) -> dict[str, str]:
    """Create or touch the bridge; a new one is filled with the current members before the
    answer, so a reader of the returned stream sees them at once."""
    tenant = runtime.tenant_id
    ref = source_ref(tags)
    stream_url = STREAM_PREFIX + ref
    async with runtime.pool.acquire() as conn:
        touched = await conn.fetchval(
            """
            UPDATE entity_bridges SET last_observer_activity_at = now(), updated_at = now()
            WHERE tenant_id = $1 AND source_ref = $2 RETURNING 1
            """,
            tenant,
            ref,
        )
    if touched is None:
        await _create_bridge(runtime, ref, tags, stream_url)
    return {"sourceRef": ref, "streamUrl": stream_url}


async def _create_bridge(
    runtime: AgentsRuntime, ref: str, tags: dict[str, str], stream_url: str
) -> None:
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        # Exclusive against the trigger's shared lock: every entity change either
        # committed before this bridge or will see it (see 0010_entity_membership.sql).
        await tx.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('entity-bridges:' || $1, 0))",
            tenant,
        )
        await tx.conn.execute(
            """
            INSERT INTO entity_bridges (tenant_id, source_ref, tags, stream_url)
            VALUES ($1, $2, $3::jsonb, $4)
            ON CONFLICT (tenant_id, source_ref) DO UPDATE SET
                last_observer_activity_at = now(), updated_at = now()
            """,
            tenant,
            ref,
            canonical_tags_json(tags),
            stream_url,
        )
        await tx.create(
            CreateSpec(path=events.stream_path(stream_url), content_type=events.JSON_CONTENT_TYPE)
        )
    # Entities that match now, and members a garbage-collected predecessor left behind.
    async with runtime.pool.acquire() as conn:
        urls = [
            row["url"]
            for row in await conn.fetch(
                """
                SELECT url FROM entities WHERE tenant_id = $1 AND tags_index @> $2::text[]
                UNION
                SELECT entity_url FROM entity_bridge_members
                WHERE tenant_id = $1 AND source_ref = $3
                """,
                tenant,
                tags_index(tags),
                ref,
            )
        ]
    for start in range(0, len(urls), RECONCILE_CHUNK):
        chunk = urls[start : start + RECONCILE_CHUNK]
        async with runtime.engine.transaction() as tx:
            await _lock_entities(tx.conn, tenant, chunk)
            await reconcile(tx, tenant, chunk, only_ref=ref)


# --- the drainer -------------------------------------------------------------------------------


class MembershipDrainer:
    """Turns queued entity changes into `members` events; one per process, any number of
    processes per database (`FOR UPDATE SKIP LOCKED` splits the queue, the per-entity
    advisory lock orders two drainers that took changes of the same entity)."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime
        self._nudged = asyncio.Event()
        self._touched: dict[str, float] = {}

    async def run(self) -> None:
        # A LISTEN on a pooled connection makes changes from any process drain at once;
        # the poll interval covers a notification missed while reconnecting.
        async with listening(self.runtime.pool, NOTIFY_CHANNEL, self._nudged.set):
            await drain_when_nudged(
                self._drain_all,
                self._nudged,
                poll_s=POLL_INTERVAL_S,
                error_pause_s=ERROR_PAUSE_S,
                what="membership drain",
            )

    async def _drain_all(self) -> None:
        while await self.drain_batch():
            pass

    async def drain_batch(self) -> bool:
        """Drain up to ROWS_PER_TRANSACTION queued changes; False when none were due."""
        tenant = self.runtime.tenant_id
        async with self.runtime.engine.transaction() as tx:
            rows = await tx.conn.fetch(
                """
                SELECT id, entity_url FROM entity_membership_outbox
                WHERE tenant_id = $1 ORDER BY id LIMIT $2
                FOR UPDATE SKIP LOCKED
                """,
                tenant,
                ROWS_PER_TRANSACTION,
            )
            if not rows:
                return False
            urls = sorted({row["entity_url"] for row in rows})
            await _lock_entities(tx.conn, tenant, urls)
            await reconcile(tx, tenant, urls)
            await tx.conn.execute(
                "DELETE FROM entity_membership_outbox WHERE id = ANY($1::bigint[])",
                [row["id"] for row in rows],
            )
        return True

    # --- liveness ------------------------------------------------------------------------

    def observed(self, path: str) -> None:
        """A GET/HEAD on `/_entities/<ref>`: keep that bridge from being collected."""
        if not path.startswith(STREAM_PREFIX):
            return
        ref = path[len(STREAM_PREFIX) :].split("/", 1)[0]
        now = time.monotonic()
        if not ref or now - self._touched.get(ref, -TOUCH_INTERVAL_S) < TOUCH_INTERVAL_S:
            return
        self._touched[ref] = now
        task = asyncio.get_running_loop().create_task(self._touch(ref))
        task.add_done_callback(_log_failure)

    async def _touch(self, ref: str) -> None:
        async with self.runtime.pool.acquire() as conn:
            await conn.execute(
                """
                UPDATE entity_bridges SET last_observer_activity_at = now()
                WHERE tenant_id = $1 AND source_ref = $2
                """,
                self.runtime.tenant_id,
                ref,
            )

    async def collect_forever(self) -> None:
        while True:
            await asyncio.sleep(GC_INTERVAL_S)
            try:
                await self.collect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("bridge collection failed: %s", error)

    async def collect(self, stale_after_s: float = STALE_AFTER_S) -> list[str]:
        """Drop bridges nobody referenced, registered or read lately; returns their refs.
        Their streams and member records stay, so a later registration resumes them."""
        tenant = self.runtime.tenant_id
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                UPDATE entity_bridges b SET last_observer_activity_at = now()
                WHERE tenant_id = $1 AND EXISTS (
                    SELECT 1 FROM entity_manifest_sources s
                    WHERE s.tenant_id = b.tenant_id AND s.source_ref = b.source_ref)
                """,
                tenant,
            )
            rows = await conn.fetch(
                """
                DELETE FROM entity_bridges
                WHERE tenant_id = $1
                  AND last_observer_activity_at < now() - make_interval(secs => $2::float8)
                RETURNING source_ref
                """,
                tenant,
                stale_after_s,
            )
        return [row["source_ref"] for row in rows]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("bridge touch failed: %s", task.exception())

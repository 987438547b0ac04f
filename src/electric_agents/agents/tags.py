"""Entity tags and the tag outbox (spec/02 §3.4, spec/03 §5.5, §3.5.7).

A tag change updates the row and queues a `tag_stream_outbox` row in one transaction, under
the entity's row lock, so outbox ids follow the order in which an entity's changes commit.
`TagOutboxDrainer` turns those rows into `tags` events on the entity's main stream.

Reference bug fixed here: its drainer claimed batches across entities, appended row by row
and retried failures later, so a retried change (or one drained by another process) could
land after a newer change of the same tag. Here an entity's rows are drained only from its
oldest live row, by one drainer at a time, and each row's append commits together with the
row's deletion: the stream gets every change once, in commit order, whatever crashes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from electric_agents.agents import events
from electric_agents.agents.entity_store import Entity, get_entity, set_tags
from electric_agents.agents.inbox import REJECTS_WRITES, entity_not_found, not_running
from electric_agents.agents.principal_entities import reject_principal_mutation
from electric_agents.agents.runtime import AgentsRuntime, drain_when_nudged
from electric_agents.agents.write_tokens import check_write_token
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.producers import ProducerHeaders

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5  # the reference drains every 500 ms
ROWS_PER_TRANSACTION = 100
MAX_ATTEMPTS = 10  # then the row is dead-lettered, as in the reference
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 60.0
ERROR_PAUSE_S = 1.0


# --- tag writes --------------------------------------------------------------------------


async def set_tag(
    runtime: AgentsRuntime, entity_url: str, key: str, value: str, token: str | None
) -> Entity:
    """POST …/tags/:key. Setting the value a tag already has changes nothing."""

    def change(tags: dict[str, str]) -> str | None:
        if tags.get(key) == value:
            return None
        op = "update" if key in tags else "insert"
        tags[key] = value
        return op

    return await _mutate_tags(runtime, entity_url, token, "tagged", key, change)


async def remove_tag(
    runtime: AgentsRuntime, entity_url: str, key: str, token: str | None
) -> Entity:
    """DELETE …/tags/:key. Removing an absent tag changes nothing."""

    def change(tags: dict[str, str]) -> str | None:
        if key not in tags:
            return None
        del tags[key]
        return "delete"

    return await _mutate_tags(runtime, entity_url, token, "untagged", key, change)


async def _mutate_tags(
    runtime: AgentsRuntime,
    entity_url: str,
    token: str | None,
    action: str,
    key: str,
    change: Callable[[dict[str, str]], str | None],
) -> Entity:
    """Checks in the reference's order (spec/02 §7.4): entity, principal guard, write
    token (401, even for a killed entity), status (409); then `change` edits the tags in
    place and names the outbox op (None: nothing changed), and the row and the outbox row
    are written under the entity's row lock."""
    tenant = runtime.tenant_id
    async with runtime.pool.acquire() as conn, conn.transaction():
        entity = await get_entity(conn, tenant, entity_url, for_update=True)
        if entity is None:
            raise entity_not_found()
        reject_principal_mutation(entity, action)
        if not await check_write_token(conn, tenant, entity_url, token):
            raise ApiError(401, "UNAUTHORIZED", "Invalid write token")
        if entity.status in REJECTS_WRITES:
            raise not_running()
        tags = dict(entity.tags)
        op = change(tags)
        if op is None:
            return entity
        entity.updated_at = await set_tags(conn, tenant, entity_url, tags)
        entity.tags = dict(sorted(tags.items()))
        await conn.execute(
            """
            INSERT INTO tag_stream_outbox (tenant_id, entity_url, collection, op, key, row_data)
            VALUES ($1, $2, 'tags', $3, $4, $5::jsonb)
            """,
            tenant,
            entity_url,
            op,
            key,
            None if op == "delete" else orjson.dumps({"key": key, "value": tags[key]}).decode(),
        )
    return entity


# --- the outbox drainer ----------------------------------------------------------------------


@dataclass(frozen=True)
class _OutboxRow:
    id: int
    entity_url: str
    op: str
    key: str
    value: str | None
    attempt_count: int
    created_at: datetime

    def event(self) -> dict[str, Any]:
        return events.tags_change(
            self.op, self.key, self.value, events.iso_from_datetime(self.created_at)
        )

    def producer(self) -> ProducerHeaders:
        # The reference's idempotent producer per row (spec/02 §8).
        return ProducerHeaders(f"tag-outbox-{self.id}", 0, 0)


# The oldest live row of an entity whose turn has come, skipping entities another drainer
# holds. A row behind an older live row is never picked, so an entity's rows go in order.
_CLAIM_HEAD = """
SELECT o.entity_url FROM tag_stream_outbox o
WHERE o.tenant_id = $1 AND o.dead_lettered_at IS NULL AND o.next_attempt_at <= now()
  AND NOT EXISTS (
      SELECT 1 FROM tag_stream_outbox p
      WHERE p.tenant_id = o.tenant_id AND p.entity_url = o.entity_url
        AND p.dead_lettered_at IS NULL AND p.id < o.id
  )
ORDER BY o.id
LIMIT 1
FOR UPDATE OF o SKIP LOCKED
"""

_LOCK_ENTITY_ROWS = """
SELECT id, entity_url, op, key, row_data, attempt_count, created_at FROM tag_stream_outbox
WHERE tenant_id = $1 AND entity_url = $2 AND dead_lettered_at IS NULL
ORDER BY id
LIMIT $3
FOR UPDATE
"""

_RECORD_FAILURE = """
UPDATE tag_stream_outbox SET
    attempt_count = attempt_count + 1,
    last_error = $2,
    next_attempt_at = now() + make_interval(secs => $3::float8),
    dead_lettered_at = CASE WHEN $4 OR attempt_count + 1 >= $5 THEN now() END
WHERE id = $1
"""


class TagOutboxDrainer:
    """Appends queued tag changes to entity main streams; one per server process, any
    number of processes per database.

    Each transaction takes one entity whose oldest live row is due (`FOR UPDATE SKIP
    LOCKED`, so drainers in other processes take other entities), locks its rows in id
    order, and for each row deletes it and appends its event with the producer
    `tag-outbox-<id>`. The first failure rolls that row back to a savepoint, schedules its
    retry with exponential backoff (or dead-letters it: after 10 attempts, or at once for a
    stream that refuses appends for good), and leaves the rows behind it waiting. A crash
    rolls back the whole transaction, append included, so nothing is lost or doubled."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """A tag change just committed here: drain now rather than at the next poll."""
        self._nudged.set()

    async def run(self) -> None:
        await drain_when_nudged(
            self.drain,
            self._nudged,
            poll_s=POLL_INTERVAL_S,
            error_pause_s=ERROR_PAUSE_S,
            what="tag outbox drain",
        )

    async def drain(self) -> int:
        """Drain until no entity has a due row; returns how many rows were appended."""
        appended = 0
        while True:
            drained = await self._drain_one_entity()
            if drained is None:
                return appended
            appended += drained

    async def _drain_one_entity(self) -> int | None:
        tenant = self.runtime.tenant_id
        async with self.runtime.engine.transaction() as tx:
            entity_url = await tx.conn.fetchval(_CLAIM_HEAD, tenant)
            if entity_url is None:
                return None
            records = await tx.conn.fetch(
                _LOCK_ENTITY_ROWS, tenant, entity_url, ROWS_PER_TRANSACTION
            )
            appended = 0
            for record in records:
                row = _row(record)
                if not await self._append_row(tx, row):
                    break
                appended += 1
            return appended

    async def _append_row(self, tx: StreamTransaction, row: _OutboxRow) -> bool:
        """Delete the row and append its event, both or neither; False after a failure."""
        try:
            async with tx.conn.transaction():  # a savepoint
                await tx.conn.execute("DELETE FROM tag_stream_outbox WHERE id = $1", row.id)
                await tx.append(
                    events.stream_path(f"{row.entity_url}/main"),
                    content_type=events.JSON_CONTENT_TYPE,
                    body=events.encode(row.event()),
                    producer=row.producer(),
                )
            return True
        except ApiError as error:
            # The stream refuses this append (closed after a kill, deleted): no retry helps.
            permanent = 400 <= error.status < 500
            await self._record_failure(tx, row, f"{error.status} {error.code}: {error}", permanent)
        except asyncpg.PostgresError as error:
            await self._record_failure(tx, row, f"{type(error).__name__}: {error}", False)
        return False

    async def _record_failure(
        self, tx: StreamTransaction, row: _OutboxRow, reason: str, permanent: bool
    ) -> None:
        attempts = row.attempt_count + 1
        dead = permanent or attempts >= MAX_ATTEMPTS
        log_line = log.warning if dead else log.info
        log_line(
            "tag outbox row %d for %s (tag %r, attempt %d) failed%s: %s",
            row.id,
            row.entity_url,
            row.key,
            attempts,
            "; dead-lettered" if dead else "",
            reason,
        )
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (attempts - 1))
        await tx.conn.execute(_RECORD_FAILURE, row.id, reason, delay, permanent, MAX_ATTEMPTS)


def _row(record: asyncpg.Record) -> _OutboxRow:
    data = record["row_data"]
    parsed = orjson.loads(data) if isinstance(data, str | bytes) else data
    return _OutboxRow(
        id=record["id"],
        entity_url=record["entity_url"],
        op=record["op"],
        key=record["key"],
        value=parsed.get("value") if isinstance(parsed, dict) else None,
        attempt_count=record["attempt_count"],
        created_at=record["created_at"],
    )

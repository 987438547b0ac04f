"""The stream engine facade: what the HTTP layer (and the agents layer) call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from electric_agents.db.held import HeldConnections
from electric_agents.errors import ApiError
from electric_agents.streams import lifecycle, store
from electric_agents.streams.hub import StreamHub
from electric_agents.streams.json_mode import parse_json_body
from electric_agents.streams.lifecycle import CreateResult, CreateSpec, require_live
from electric_agents.streams.model import StreamMeta, is_json_type
from electric_agents.streams.producers import ProducerHeaders
from electric_agents.streams.read_cache import ReadCache
from electric_agents.streams.reads import Chunk, LiveSession, read_chunk
from electric_agents.streams.writer import AppendRequest, AppendResult, AppendWriter

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0
DEADLOCK_RETRIES = 3
# Connections kept for reads between requests; more concurrent reads borrow from the pool.
READ_CONNECTIONS_KEPT = 4


class StreamTransaction:
    """Stream writes that commit with the caller's other writes in one transaction (spawn:
    the entity row, its streams and first events, together or not at all). Readers are
    woken only after the commit."""

    def __init__(self, engine: StreamEngine, conn: asyncpg.Connection) -> None:
        self.engine = engine
        self.conn = conn
        self._after_commit: list[Callable[[], None]] = []

    async def create(self, spec: CreateSpec) -> CreateResult:
        result = await lifecycle.create_stream_in(self.conn, self.engine.hub, spec)
        if result is None:
            raise ApiError(409, "STREAM_CONFLICT", "Stream is being created concurrently")
        if result.created:
            self.engine.writer.forget(spec.path)
            self._after_commit.append(lambda: self.engine.hub.publish_created(spec.path))
        return result

    async def append(
        self,
        path: str,
        *,
        content_type: str | None,
        body: bytes,
        close: bool = False,
        producer: ProducerHeaders | None = None,
        stream_seq: str | None = None,
    ) -> AppendResult:
        request = self.engine.append_request(
            path,
            content_type=content_type,
            body=body,
            close=close,
            producer=producer,
            stream_seq=stream_seq,
        )
        return await self.append_prepared(request)

    async def append_prepared(self, request: AppendRequest) -> AppendResult:
        result, publish = await self.engine.writer.append_in_transaction(self.conn, request)
        self._after_commit.append(publish)
        return result

    def committed(self) -> None:
        for callback in self._after_commit:
            callback()


@dataclass(frozen=True)
class InTransaction:
    """Work that commits in an append's transaction, given the append's result, and the
    other streams it will append to (locked up front with the appended one, in id order
    like every batch, so such transactions do not deadlock one another)."""

    run: Callable[[StreamTransaction, AppendResult], Awaitable[None]]
    also_appends_to: tuple[str, ...] = ()


class StreamEngine:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.hub = StreamHub()
        self.writer = AppendWriter(pool, self.hub)
        # Reads run short statements that leave no session state (see db/held.py).
        self._read_connections = HeldConnections(pool, keep=READ_CONNECTIONS_KEPT)
        self.read_cache = ReadCache()
        self._database_url = database_url
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.hub.start(self._database_url)
        self.writer.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="stream-expiry-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.writer.stop()
        await self._read_connections.close()
        await self.hub.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                while await lifecycle.sweep_expired(self.pool, self.hub) > 0:
                    await asyncio.sleep(0)
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("expired stream sweep failed: %s", error)

    async def create(self, spec: CreateSpec) -> CreateResult:
        result = await lifecycle.create_stream(self.pool, self.hub, spec)
        if result.created:
            self.writer.forget(spec.path)
        return result

    async def delete(self, path: str) -> None:
        self.writer.forget(path)
        await lifecycle.delete_stream(self.pool, self.hub, path)

    async def head(self, path: str) -> StreamMeta:
        async with self._read_connections.connection() as conn:
            return require_live(await store.get_meta(conn, path))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[StreamTransaction]:
        """A database transaction in which stream writes join the caller's own SQL."""
        async with self.pool.acquire() as conn:
            tx = StreamTransaction(self, conn)
            async with conn.transaction():
                yield tx
            tx.committed()

    async def append(
        self,
        path: str,
        *,
        content_type: str | None,
        body: bytes,
        close: bool = False,
        producer: ProducerHeaders | None = None,
        stream_seq: str | None = None,
    ) -> AppendResult:
        """Append (and/or close) following spec/01 §A.5; the caller checked steps 1-4."""
        request = self.append_request(
            path,
            content_type=content_type,
            body=body,
            close=close,
            producer=producer,
            stream_seq=stream_seq,
        )
        return await self.writer.enqueue(request)

    async def append_then(self, request: AppendRequest, *, then: InTransaction) -> AppendResult:
        """Append in a transaction of its own (not group commit) and run `then` in it, so
        what the append causes (wake evaluation) commits with it or not at all. Retried
        when Postgres picks the transaction as a deadlock victim (a stream `then` did not
        announce, or a lock taken outside the stream rows)."""
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                async with self.transaction() as tx:
                    await store.lock_metas(tx.conn, sorted({request.path, *then.also_appends_to}))
                    result = await tx.append_prepared(request)
                    await then.run(tx, result)
                return result
            except asyncpg.DeadlockDetectedError:
                if attempt == DEADLOCK_RETRIES:
                    raise
                log.info("append to %s lost a deadlock; retrying", request.path)
        raise AssertionError("unreachable")

    @staticmethod
    def append_request(
        path: str,
        *,
        content_type: str | None,
        body: bytes,
        close: bool = False,
        producer: ProducerHeaders | None = None,
        stream_seq: str | None = None,
    ) -> AppendRequest:
        request = AppendRequest(
            path=path,
            content_type=content_type,
            body=body,
            close=close,
            producer=producer,
            stream_seq=stream_seq,
        )
        if body and content_type is not None and is_json_type(content_type):
            try:
                request.json_batch = parse_json_body(body, allow_empty_array=False)
            except ApiError as error:
                request.json_error = error
        return request

    async def catch_up(self, path: str, after: int | None) -> tuple[StreamMeta, Chunk]:
        """A catch-up read from `after` (None: `offset=now`)."""
        async with self._read_connections.connection() as conn:
            meta = require_live(await store.get_meta(conn, path, touch=True))
            if after is None:
                return meta, Chunk([], meta.tail, True, meta.closed)
            return meta, await read_chunk(conn, meta, after, self.read_cache)

    def live(self, path: str) -> LiveSession:
        return LiveSession(self._read_connections, self.hub, self.read_cache, path)

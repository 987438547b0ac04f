"""The stream engine facade: what the HTTP layer (and the agents layer) call."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from electric_agents.errors import ApiError
from electric_agents.streams import lifecycle, store
from electric_agents.streams.hub import StreamHub
from electric_agents.streams.json_mode import parse_json_body
from electric_agents.streams.lifecycle import CreateResult, CreateSpec, require_live
from electric_agents.streams.model import StreamMeta, is_json_type
from electric_agents.streams.producers import ProducerHeaders
from electric_agents.streams.reads import Chunk, LiveSession, read_chunk
from electric_agents.streams.writer import AppendRequest, AppendResult, AppendWriter

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


class StreamEngine:
    def __init__(self, pool: asyncpg.Pool, database_url: str) -> None:
        self.pool = pool
        self.hub = StreamHub()
        self.writer = AppendWriter(pool, self.hub)
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
        async with self.pool.acquire() as conn:
            return require_live(await store.get_meta(conn, path))

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
        return await self.writer.submit(request)

    async def catch_up(self, path: str, after: int | None) -> tuple[StreamMeta, Chunk]:
        """A catch-up read from `after` (None: `offset=now`)."""
        async with self.pool.acquire() as conn:
            meta = require_live(await store.get_meta(conn, path, touch=True))
            if after is None:
                return meta, Chunk([], meta.tail, True, meta.closed)
            return meta, await read_chunk(conn, meta, after)

    def live(self, path: str) -> LiveSession:
        return LiveSession(self.pool, self.hub, path)

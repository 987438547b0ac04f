"""Catch-up and live reads (spec/01 §A.10, §A.11, §A.15)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from types import TracebackType

import asyncpg

from electric_agents.db.held import HeldConnections
from electric_agents.streams import store
from electric_agents.streams.hub import Follower, StreamHub, Watch
from electric_agents.streams.lifecycle import require_live
from electric_agents.streams.model import Message, StreamMeta
from electric_agents.streams.read_cache import ReadCache


@dataclass(frozen=True)
class Chunk:
    """A read result: the messages after a start offset, and where the reader stands."""

    messages: list[Message]
    next_offset: int
    up_to_date: bool
    closed: bool  # the stream is closed and this chunk reaches its final offset
    # The messages as a response body, when the read cache already had it encoded.
    encoded: bytes | None = None


def response_body(meta: StreamMeta, chunk: Chunk) -> bytes:
    """The bytes a read returns: a JSON stream's values as one array (spec/01 §A.14), any
    other stream's messages concatenated."""
    if chunk.encoded is not None:
        return chunk.encoded
    return encode_messages(meta, chunk.messages)


def encode_messages(meta: StreamMeta, messages: list[Message]) -> bytes:
    if meta.is_json:
        return b"[" + b",".join(m.data for m in messages) + b"]"
    return b"".join(m.data for m in messages)


def start_position(offset: int | str | None, meta: StreamMeta) -> int:
    """The position a read starts after: -1/absent is the beginning, `now` the tail."""
    if offset is None or offset == -1:
        return 0
    if offset == "now":
        return meta.tail
    assert isinstance(offset, int)
    return offset


async def read_chunk(
    conn: asyncpg.Connection, meta: StreamMeta, after: int, cache: ReadCache
) -> Chunk:
    """Messages after `after` up to the tail in `meta` (a consistent upper bound)."""
    messages: list[Message] = []
    encoded = None
    if after < meta.tail:
        cached = cache.get(meta.id, after, meta.tail)
        if cached is None:
            messages = await store.read_messages(conn, meta, after, meta.tail)
            encoded = encode_messages(meta, messages)
            cache.put(meta.id, after, meta.tail, messages, encoded)
        else:
            messages, encoded = cached.messages, cached.body
    # With nothing to return (at, or beyond, the tail) the reader is sent to the tail.
    next_offset = messages[-1].offset if messages else meta.tail
    up_to_date = next_offset >= meta.tail
    return Chunk(messages, next_offset, up_to_date, meta.closed and up_to_date, encoded)


class LiveSession:
    """A long-poll or SSE reader: registered with the hub before it reads the stream row, so
    no commit slips between its read and its wait."""

    def __init__(
        self, connections: HeldConnections, hub: StreamHub, cache: ReadCache, path: str
    ) -> None:
        self._connections = connections
        self._hub = hub
        self._cache = cache
        self._path = path
        self._watch_cm = hub.watch(path)
        self._watch: Watch | None = None
        self.meta: StreamMeta | None = None

    async def __aenter__(self) -> LiveSession:
        self._watch = self._watch_cm.__enter__()
        try:
            async with self._connections.connection() as conn:
                self.meta = require_live(await store.get_meta(conn, self._path, touch=True))
        except BaseException:
            self._watch_cm.__exit__(None, None, None)
            raise
        self._watch.observe(self.meta.tail, self.meta.closed)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._watch_cm.__exit__(exc_type, exc, tb)

    async def next_chunk(self, after: int, timeout_s: float) -> Chunk | None:
        """The next data after `after`, or the closed EOF, waiting up to `timeout_s`.

        None means the wait timed out with nothing new.
        """
        watch, meta = self._watch, self.meta
        assert watch is not None and meta is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if watch.stale:
                # Deleted, or notifications were interrupted: trust only the database.
                watch.stale = False
                async with self._connections.connection() as conn:
                    fresh = require_live(await store.get_meta(conn, self._path))
                if fresh.id != meta.id:
                    require_live(None)
                watch.observe(fresh.tail, fresh.closed)
            if after < watch.tail:
                return await self._read(after)
            if watch.closed:
                return Chunk([], watch.tail, True, True)
            if self._hub.ending:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await watch.wait(remaining):
                return None

    def follow(self, follower: Follower, after: int) -> bool:
        """Have `follower` handed each change from `after` on as it commits, instead of
        reading it; False if the reader is not exactly at a live, open tail."""
        watch = self._watch
        assert watch is not None
        if self._hub.ending or watch.stale or watch.closed or watch.tail != after:
            return False
        watch.followers.append(follower)
        return True

    @property
    def ending(self) -> bool:
        """The server is stopping; a live response should end after what it has."""
        return self._hub.ending

    def unfollow(self, follower: Follower) -> None:
        watch = self._watch
        if watch is not None and follower in watch.followers:
            watch.followers.remove(follower)

    async def _read(self, after: int) -> Chunk:
        watch, meta = self._watch, self.meta
        assert watch is not None and meta is not None
        tail, closed = watch.tail, watch.closed
        cached = watch.messages_after(after)
        if cached:
            next_offset = cached[-1].offset
            return Chunk(cached, next_offset, next_offset >= tail, closed and next_offset >= tail)
        async with self._connections.connection() as conn:
            return await read_chunk(
                conn, replace(meta, tail=tail, closed=closed), after, self._cache
            )

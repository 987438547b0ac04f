"""Connections held for a purpose: the few a hot path keeps out of the pool between uses, and
the one a background worker LISTENs on.

Releasing a connection to the asyncpg pool runs its reset query (`RESET ALL`, `UNLISTEN *`,
...): one more round trip and some Postgres CPU on every use. The append writer and the
readers run thousands of short statements a second that leave no session state behind, so
they hold a few connections and hand them back to the pool only when a use failed (the pool
then resets or drops it) or when more are held than wanted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg


class HeldConnections:
    def __init__(self, pool: asyncpg.Pool, keep: int) -> None:
        self._pool = pool
        self._keep = keep
        self._idle: list[asyncpg.Connection] = []

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for statements that leave no session state (transactions must end
        inside the block)."""
        conn = self._idle.pop() if self._idle else await self._pool.acquire()
        try:
            yield conn
        except BaseException:
            await self._pool.release(conn)
            raise
        if len(self._idle) < self._keep and not conn.is_closed() and not conn.is_in_transaction():
            self._idle.append(conn)
        else:
            await self._pool.release(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._pool.release(conn)


@contextlib.asynccontextmanager
async def listening(
    pool: asyncpg.Pool, channel: str, on_notify: Callable[[], None]
) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection that LISTENs on `channel` for the block, calling `on_notify`
    for each notification (background workers use it to wake at once when another process
    queued work for them)."""

    def callback(*_: object) -> None:
        on_notify()

    async with pool.acquire() as conn:
        await conn.add_listener(channel, callback)
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                await conn.remove_listener(channel, callback)

"""The shape change log: sequencing, retention and live wakeups (migration 0011).

Triggers write every change of a shape table to `shape_changes` in the writer's own
transaction. Offsets must follow visibility, which bigserial ids do not, so this module
stamps commit-ordered `position`s on committed changes: one sequencer at a time (it holds
the `shape_log_head` row lock), in seq order. A reader that sees position P therefore sees
every smaller position too. Every process runs a sequencer; the row lock makes them take
turns, and whichever runs first sequences everybody's changes.

Wakeups across processes: the trigger's NOTIFY `shape_changes` (sent at commit) nudges the
sequencers; a sequencer that advanced the head sends NOTIFY `shape_log_advanced` with the
new head, which wakes live shape readers in every process. A poll interval covers a lost
LISTEN connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

log = logging.getLogger(__name__)

CHANGES_CHANNEL = "shape_changes"
ADVANCED_CHANNEL = "shape_log_advanced"
POLL_INTERVAL_S = 1.0
ERROR_PAUSE_S = 1.0
SEQUENCE_BATCH = 5000
# How many changes the log keeps; a client whose offset fell below must refetch (409).
DEFAULT_RETAINED_CHANGES = 100_000
PRUNE_INTERVAL_S = 60.0


async def sequence_batch(conn: asyncpg.Connection) -> tuple[int, int]:
    """Stamp positions on up to SEQUENCE_BATCH committed changes; returns (head, count)."""
    async with conn.transaction():
        head: int = await conn.fetchval("SELECT position FROM shape_log_head FOR UPDATE")
        # Read committed: this statement sees every change committed before the lock was
        # granted, so a change committing later gets a larger position than all of these.
        seqs = await conn.fetchval(
            """
            SELECT coalesce(array_agg(seq ORDER BY seq), '{}') FROM (
                SELECT seq FROM shape_changes WHERE position IS NULL ORDER BY seq LIMIT $1
            ) pending
            """,
            SEQUENCE_BATCH,
        )
        if not seqs:
            return head, 0
        await conn.execute(
            """
            UPDATE shape_changes c SET position = $2 + v.n
            FROM unnest($1::bigint[]) WITH ORDINALITY AS v(seq, n)
            WHERE c.seq = v.seq
            """,
            seqs,
            head,
        )
        head += len(seqs)
        await conn.execute("UPDATE shape_log_head SET position = $1", head)
        await conn.execute("SELECT pg_notify($1, $2)", ADVANCED_CHANNEL, str(head))
    return head, len(seqs)


async def prune(conn: asyncpg.Connection, retained_changes: int) -> int:
    """Delete changes more than `retained_changes` positions behind the head; returns the
    new `purged_through`. Readers behind it get must-refetch."""
    async with conn.transaction():
        head, purged = await conn.fetchrow(
            "SELECT position, purged_through FROM shape_log_head FOR UPDATE"
        )
        cutoff = head - retained_changes
        if cutoff <= purged:
            return int(purged)
        await conn.execute(
            "DELETE FROM shape_changes WHERE position IS NOT NULL AND position <= $1", cutoff
        )
        await conn.execute("UPDATE shape_log_head SET purged_through = $1", cutoff)
    return cutoff


class ShapeLog:
    """Runs this process's sequencer and tells live readers when the head moves."""

    def __init__(
        self, pool: asyncpg.Pool, *, retained_changes: int = DEFAULT_RETAINED_CHANGES
    ) -> None:
        self.pool = pool
        self.retained_changes = retained_changes
        self.head = 0  # the highest position known to be sequenced
        self._advanced = asyncio.Event()
        self._nudged = asyncio.Event()
        # True while `head` follows the log (LISTEN connected, sequenced at least once).
        self._following = False
        self._ending = False  # the server is stopping (`end_waits`)

    async def current_head(self) -> int:
        """The sequenced head: this process's view while it follows NOTIFYs, else read."""
        if self._following:
            return self.head
        async with self.pool.acquire() as conn:
            head: int = await conn.fetchval("SELECT position FROM shape_log_head")
        self._head_seen(head)
        return head

    def _head_seen(self, head: int) -> None:
        if head > self.head:
            self.head = head
            self._wake_waiters()

    def end_waits(self) -> None:
        """The server is stopping: live shape requests answer now, as on a timeout."""
        self._ending = True
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        # Wake everyone waiting, then start a fresh event for the next advance.
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def wait_beyond(self, position: int, timeout_s: float) -> bool:
        """Wait until the head passes `position`; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.head <= position:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._ending:
                return False
            try:
                await asyncio.wait_for(self._advanced.wait(), remaining)
            except TimeoutError:
                return self.head > position
        return True

    def _on_advanced(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self._head_seen(int(payload))

    async def run(self) -> None:
        """The sequencer worker, from startup to shutdown."""
        listener = await self._listen()
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        try:
            while True:
                try:
                    async with self.pool.acquire() as conn:
                        while True:
                            head, count = await sequence_batch(conn)
                            self._head_seen(head)
                            if count < SEQUENCE_BATCH:
                                break
                        if loop.time() >= next_prune:
                            await prune(conn, self.retained_changes)
                            next_prune = loop.time() + PRUNE_INTERVAL_S
                    self._following = listener is not None and not listener.is_closed()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    self._following = False
                    log.warning("shape log sequencing failed, retrying: %s", error)
                    await asyncio.sleep(ERROR_PAUSE_S)
                if listener is None or listener.is_closed():
                    if listener is not None:
                        log.warning("shape log LISTEN connection lost; reconnecting")
                        await self._unlisten(listener)
                    listener = await self._listen()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudged.wait(), POLL_INTERVAL_S)
                self._nudged.clear()
        finally:
            self._following = False
            if listener is not None:
                await self._unlisten(listener)

    async def _listen(self) -> asyncpg.Connection | None:
        # A pooled connection kept for the worker's lifetime (the pool knows the database
        # also when it is embedded).
        conn: asyncpg.Connection | None = None
        try:
            conn = await self.pool.acquire()
            await conn.add_listener(CHANGES_CHANNEL, self._on_changes)
            await conn.add_listener(ADVANCED_CHANNEL, self._on_advanced)
            return conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("shape log polls only, LISTEN failed: %s", error)
            if conn is not None:
                await self._unlisten(conn)
            return None

    async def _unlisten(self, conn: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):
            await conn.remove_listener(CHANGES_CHANNEL, self._on_changes)
            await conn.remove_listener(ADVANCED_CHANNEL, self._on_advanced)
        with contextlib.suppress(Exception):
            await self.pool.release(conn)

    def _on_changes(self, *_: object) -> None:
        self._nudged.set()

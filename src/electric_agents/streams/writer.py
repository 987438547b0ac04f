"""Appends with group commit.

Concurrent appends queue up; one task takes everything queued and commits it in a single
transaction: lock the touched stream rows (in id order, so processes never deadlock), check
each append in arrival order against the locked state (spec/01 §A.5 decision procedure),
insert the messages, write the new tails and producer states, NOTIFY, commit. Only then is
each request answered, so an acknowledged append is durable. Appends to one stream, and the
producer checks for it, are strictly ordered: within a batch by arrival, across batches and
processes by the row lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import asyncpg

from electric_agents.db.held import HeldConnections
from electric_agents.errors import ApiError
from electric_agents.streams import store
from electric_agents.streams.hub import CHANNEL, StreamHub
from electric_agents.streams.json_mode import JsonBatch
from electric_agents.streams.model import Message, Presence, StreamMeta, media_type
from electric_agents.streams.offsets import MESSAGE_OVERHEAD, format_offset
from electric_agents.streams.producers import (
    ProducerHeaders,
    ProducerOutcome,
    ProducerState,
    check_producer,
)
from electric_agents.streams.write_cache import CachedStream, WriteCache

log = logging.getLogger(__name__)

# A batch stops growing at this many requests or bytes; the rest waits for the next one.
MAX_BATCH_REQUESTS = 1024
MAX_BATCH_BYTES = 32 * 1024 * 1024
# Fast-path batches committing at once; each waits for its fsync while the next is built.
MAX_IN_FLIGHT = 4

T = TypeVar("T")

# One statement commits a batch. The conditional UPDATE is the check that no other process
# appended to, closed or deleted a stream since the writer last saw it (it takes the row
# locks; under READ COMMITTED it re-checks a row another commit changed while it waited).
# If a stream moved on, `ds_stream_moved()` raises EA001 and the statement rolls back; the
# message insert may instead hit the primary key first (23505). Either way nothing is
# written and the writer takes its locking path.
STREAM_MOVED_SQLSTATE = "EA001"
_APPEND_BATCH = """
WITH updated AS (
    UPDATE ds_streams s SET
        tail = v.tail, closed = v.closed, closed_by_producer = v.cbp,
        closed_by_epoch = v.cbe, closed_by_seq = v.cbs, last_stream_seq = v.lss,
        last_access_at = now()
    FROM unnest($1::bigint[], $2::bigint[], $3::boolean[], $4::bigint[], $5::boolean[],
                $6::text[], $7::bigint[], $8::bigint[], $9::text[])
         AS v(id, expected_tail, expected_closed, tail, closed, cbp, cbe, cbs, lss)
    WHERE s.id = v.id AND s.tail = v.expected_tail AND s.closed = v.expected_closed
      AND NOT s.soft_deleted
    RETURNING s.id
), messages AS (
    INSERT INTO ds_messages (stream_id, off, data)
    SELECT * FROM unnest($10::bigint[], $11::bigint[], $12::bytea[])
), producers AS (
    INSERT INTO ds_producers (stream_id, producer_id, epoch, last_seq)
    SELECT * FROM unnest($13::bigint[], $14::text[], $15::bigint[], $16::bigint[])
    ON CONFLICT (stream_id, producer_id)
    DO UPDATE SET epoch = EXCLUDED.epoch, last_seq = EXCLUDED.last_seq, updated_at = now()
), notified AS (
    SELECT pg_notify($17, payload) FROM unnest($18::text[]) AS payload
)
SELECT CASE WHEN (SELECT count(*) FROM updated) = cardinality($1::bigint[])
            THEN (SELECT count(*) FROM notified)
            ELSE ds_stream_moved() END
"""


@dataclass
class AppendRequest:
    path: str
    content_type: str | None
    body: bytes
    close: bool
    producer: ProducerHeaders | None
    stream_seq: str | None
    # JSON-mode bodies are parsed before queueing (off the commit path); a parse error is
    # reported only where the decision procedure reaches it (step 10).
    json_batch: JsonBatch | None = None
    json_error: ApiError | None = None
    future: asyncio.Future[AppendResult] = field(default_factory=lambda: asyncio.Future())


@dataclass(frozen=True)
class AppendResult:
    status: int
    headers: dict[str, str]


@dataclass
class _WorkingStream:
    """A stream's state as the batch changes it, starting from what was read or cached."""

    meta: StreamMeta
    # Stored producer state as of `meta` (None: none stored yet), for the producers used.
    producers: dict[str, ProducerState | None]
    tail: int = 0
    closed: bool = False
    closed_by: tuple[str, int, int] | None = None
    last_stream_seq: str | None = None
    touched: bool = False
    new_messages: list[Message] = field(default_factory=list)
    producer_updates: dict[str, ProducerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        meta = self.meta
        self.tail, self.closed, self.last_stream_seq = meta.tail, meta.closed, meta.last_stream_seq
        if meta.closed_by_producer is not None:
            self.closed_by = (
                meta.closed_by_producer,
                meta.closed_by_epoch or 0,
                meta.closed_by_seq or 0,
            )

    @property
    def changed(self) -> bool:
        return bool(self.new_messages) or self.closed != self.meta.closed

    def result_meta(self) -> StreamMeta:
        by = self.closed_by
        return replace(
            self.meta,
            tail=self.tail,
            closed=self.closed,
            closed_by_producer=by[0] if by else None,
            closed_by_epoch=by[1] if by else None,
            closed_by_seq=by[2] if by else None,
            last_stream_seq=self.last_stream_seq,
        )


class AppendWriter:
    def __init__(self, pool: asyncpg.Pool, hub: StreamHub) -> None:
        self._connections = HeldConnections(pool, keep=MAX_IN_FLIGHT + 1)
        self._hub = hub
        self._cache = WriteCache()
        self._queue: list[AppendRequest] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Fast-path batches being committed, oldest first, and those that found their
        # streams moved on and must be redone, in batch order, on the locking path.
        self._in_flight: dict[asyncio.Task[None], set[str]] = {}
        self._redo: list[tuple[int, list[AppendRequest]]] = []
        self._batch_number = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="append-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._in_flight.clear()
        stopping = ApiError(503, "SERVER_STOPPING", "Server is shutting down")
        for _, batch in self._redo:
            self._fail(batch, stopping)
        self._fail(self._queue, stopping)
        self._queue.clear()
        await self._connections.close()

    def forget(self, path: str) -> None:
        """Drop cached state for a stream changed outside the writer (create, delete)."""
        self._cache.forget(path)

    def enqueue(self, request: AppendRequest) -> asyncio.Future[AppendResult]:
        """Queue an append for the next batch; the future resolves once it is committed
        (or fails with its ApiError)."""
        self._queue.append(request)
        self._wakeup.set()
        return request.future

    async def _run(self) -> None:
        """Take batches off the queue. A batch whose streams are all cached is checked in
        memory and its commit started; while it waits for its fsync, a batch for other
        streams can start too. Appends to a stream being committed wait and join the next
        batch (row locks would serialize them anyway, and one bigger batch is cheaper).
        A batch with uncached streams waits for the pipeline to empty and commits under
        row locks."""
        while True:
            if self._redo:
                await self._drain_in_flight()
                for _, batch in sorted(self._redo, key=lambda item: item[0]):
                    await self._commit_locked_isolating(batch)
                self._redo.clear()
                continue
            if not self._queue:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            if self._in_flight and (
                len(self._in_flight) >= MAX_IN_FLIGHT or self._queue_overlaps_in_flight()
            ):
                await asyncio.wait(list(self._in_flight), return_when=asyncio.FIRST_COMPLETED)
                continue
            batch = self._take_batch()
            self._batch_number += 1
            prepared = await self._guarded(batch, self._prepare_fast(batch))
            if prepared is None:
                if not all(r.future.done() for r in batch):
                    await self._drain_in_flight()
                    await self._commit_locked_isolating(batch)
                continue
            task = asyncio.create_task(self._send_fast(self._batch_number, batch, *prepared))
            self._in_flight[task] = {r.path for r in batch}
            task.add_done_callback(self._on_batch_done)

    def _queue_overlaps_in_flight(self) -> bool:
        busy = set().union(*self._in_flight.values())
        return any(r.path in busy for r in self._queue[:MAX_BATCH_REQUESTS])

    def _on_batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wakeup.set()

    async def _drain_in_flight(self) -> None:
        while self._in_flight:
            await asyncio.wait(list(self._in_flight))

    async def _commit_locked_isolating(self, batch: list[AppendRequest]) -> None:
        """Commit under row locks; if the batch fails as a whole, commit each request on
        its own, so one request the database refuses cannot fail everyone else's."""
        if len(batch) == 1:
            await self._guarded(batch, self._commit_locked(batch))
            return
        try:
            await self._commit_locked(batch)
        except asyncio.CancelledError:
            self._fail(batch, ApiError(503, "SERVER_STOPPING", "Server is shutting down"))
            raise
        except Exception:
            log.warning("append batch of %d failed; retrying its requests one by one", len(batch))
            for request in batch:
                self._cache.forget(request.path)
            for request in batch:
                await self._guarded([request], self._commit_locked([request]))

    async def _guarded(self, batch: list[AppendRequest], step: Awaitable[T]) -> T | None:
        """Run one step of a batch; a storage failure answers its requests with a 503."""
        try:
            return await step
        except asyncio.CancelledError:
            self._fail(batch, ApiError(503, "SERVER_STOPPING", "Server is shutting down"))
            raise
        except Exception:
            log.exception("append batch of %d failed", len(batch))
            for request in batch:
                self._cache.forget(request.path)
            self._fail(batch, ApiError(503, "STORAGE_UNAVAILABLE", "Append failed"))
            return None

    def _take_batch(self) -> list[AppendRequest]:
        size = 0
        count = 0
        for request in self._queue:
            too_big = count and size + len(request.body) > MAX_BATCH_BYTES
            if count >= MAX_BATCH_REQUESTS or too_big:
                break
            size += len(request.body)
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    @staticmethod
    def _fail(batch: list[AppendRequest], error: ApiError) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    # The fast path: checked in memory, committed in one statement -----------------------

    async def _prepare_fast(
        self, batch: list[AppendRequest]
    ) -> tuple[dict[str, _WorkingStream], list[AppendResult | ApiError]] | None:
        """Apply the batch to the cached state (None if some stream is not cached as
        current), and fold the result into the cache before it commits."""
        entries = await self._cached_entries(batch)
        if entries is None:
            return None
        working = {path: _WorkingStream(e.meta, dict(e.producers)) for path, e in entries.items()}
        outcomes = self._apply_all(batch, working)
        for path, stream in working.items():
            entry = entries[path]
            entry.meta = stream.result_meta()
            for producer_id, state in stream.producer_updates.items():
                self._cache.remember_producer(entry, producer_id, state)
        return working, outcomes

    async def _send_fast(
        self,
        number: int,
        batch: list[AppendRequest],
        working: dict[str, _WorkingStream],
        outcomes: list[AppendResult | ApiError],
    ) -> None:
        async def commit() -> bool:
            async with self._connections.connection() as conn:
                return await self._write(conn, working)

        try:
            moved = await commit()
        except asyncio.CancelledError:
            self._fail(batch, ApiError(503, "SERVER_STOPPING", "Server is shutting down"))
            raise
        except Exception:
            log.warning("append batch of %d failed; redoing it under locks", len(batch))
            moved = True
        if moved:
            # Our view was stale (another process wrote), or the batch failed: redo it on
            # the locking path, request by request if need be.
            for request in batch:
                self._cache.forget(request.path)
            self._redo.append((number, batch))
            return
        self._finish(batch, working, outcomes)

    async def _cached_entries(self, batch: list[AppendRequest]) -> dict[str, CachedStream] | None:
        """Cache entries for every stream and producer of the batch, reading misses from
        the database (without locks); None if some stream cannot take the fast path."""
        paths = {r.path for r in batch}
        entries = {p: e for p in paths if (e := self._cache.get(p)) is not None}
        missing = [p for p in paths if p not in entries]
        if missing:
            async with self._connections.connection() as conn:
                for meta in (await store.get_metas(conn, missing)).values():
                    entry = self._cache.put_fresh(meta)
                    if entry is not None:
                        entries[meta.path] = entry
            if len(entries) < len(paths):
                return None
        wanted = {
            (r.path, r.producer.producer_id)
            for r in batch
            if r.producer is not None and r.producer.producer_id not in entries[r.path].producers
        }
        if wanted:
            keys = [(entries[path].meta.id, pid) for path, pid in wanted]
            async with self._connections.connection() as conn:
                found = await store.fetch_producers(
                    conn, [k[0] for k in keys], [k[1] for k in keys]
                )
            for path, pid in wanted:
                self._cache.remember_producer(
                    entries[path], pid, _stored_state(found, entries[path].meta.id, pid)
                )
        return entries

    # The locking path: any stream not cached as current ---------------------------------

    async def _commit_locked(self, batch: list[AppendRequest]) -> None:
        async with self._connections.connection() as conn, conn.transaction():
            working, outcomes = await self._apply_locked(conn, batch)
        self._after_locked_commit(batch, working, outcomes)

    async def append_in_transaction(
        self, conn: asyncpg.Connection, request: AppendRequest
    ) -> tuple[AppendResult, Callable[[], None]]:
        """Append inside the caller's transaction (spawn, signals: several writes that
        commit together). Raises the append's error, so the caller's transaction rolls
        back; returns the result and what to call once the caller has committed."""
        working, outcomes = await self._apply_locked(conn, [request])
        outcome = outcomes[0]
        if isinstance(outcome, ApiError):
            raise outcome
        return outcome, lambda: self._after_locked_commit([request], working, outcomes)

    async def _apply_locked(
        self, conn: asyncpg.Connection, batch: list[AppendRequest]
    ) -> tuple[dict[str, _WorkingStream], list[AppendResult | ApiError]]:
        """Check and write a batch under row locks, inside the connection's transaction."""
        metas = await store.lock_metas(conn, sorted({r.path for r in batch}))
        keys = {
            (metas[r.path].id, r.producer.producer_id)
            for r in batch
            if r.producer is not None and r.path in metas
        }
        stored = (
            await store.fetch_producers(conn, [k[0] for k in keys], [k[1] for k in keys])
            if keys
            else {}
        )
        working: dict[str, _WorkingStream] = {}
        for path, meta in metas.items():
            used = {pid for sid, pid in keys if sid == meta.id}
            working[path] = _WorkingStream(
                meta,
                {pid: _stored_state(stored, meta.id, pid) for pid in used},
            )
        outcomes = self._apply_all(batch, working)
        if await self._write(conn, working):
            raise RuntimeError("locked streams changed during an append batch")
        return working, outcomes

    def _after_locked_commit(
        self,
        batch: list[AppendRequest],
        working: dict[str, _WorkingStream],
        outcomes: list[AppendResult | ApiError],
    ) -> None:
        for stream in working.values():
            entry = self._cache.put_fresh(stream.result_meta())
            if entry is not None:
                for producer_id, state in {**stream.producers, **stream.producer_updates}.items():
                    self._cache.remember_producer(entry, producer_id, state)
        self._finish(batch, working, outcomes)

    async def _write(self, conn: asyncpg.Connection, working: dict[str, _WorkingStream]) -> bool:
        """Write the batch's effects in one statement; True if some stream moved on since
        it was read (then nothing was written)."""
        touched = sorted((w for w in working.values() if w.touched), key=lambda w: w.meta.id)
        if not touched:
            return False
        messages = [(w.meta.id, m) for w in touched for m in w.new_messages]
        producers = [
            (w.meta.id, pid, state) for w in touched for pid, state in w.producer_updates.items()
        ]
        closed_by = [w.closed_by or (None, None, None) for w in touched]
        try:
            await conn.fetchval(
                _APPEND_BATCH,
                [w.meta.id for w in touched],
                [w.meta.tail for w in touched],
                [w.meta.closed for w in touched],
                [w.tail for w in touched],
                [w.closed for w in touched],
                [c[0] for c in closed_by],
                [c[1] for c in closed_by],
                [c[2] for c in closed_by],
                [w.last_stream_seq for w in touched],
                [sid for sid, _ in messages],
                [m.offset for _, m in messages],
                [m.data for _, m in messages],
                [sid for sid, _, _ in producers],
                [pid for _, pid, _ in producers],
                [state.epoch for _, _, state in producers],
                [state.last_seq for _, _, state in producers],
                CHANNEL,
                self._notify_payloads(working),
            )
        except asyncpg.PostgresError as error:
            if error.sqlstate == STREAM_MOVED_SQLSTATE or (
                isinstance(error, asyncpg.UniqueViolationError)
                and error.table_name == "ds_messages"
            ):
                return True
            raise
        return False

    # Shared by both paths ----------------------------------------------------------------

    def _apply_all(
        self, batch: list[AppendRequest], working: dict[str, _WorkingStream]
    ) -> list[AppendResult | ApiError]:
        outcomes: list[AppendResult | ApiError] = []
        for request in batch:
            try:
                outcomes.append(_apply(request, working.get(request.path)))
            except ApiError as error:
                outcomes.append(error)
        return outcomes

    def _notify_payloads(self, working: dict[str, _WorkingStream]) -> list[str]:
        changed = [(s.meta.path, s.tail, s.closed) for s in working.values() if s.changed]
        return self._hub.notify_payloads(changed, []) if changed else []

    def _finish(
        self,
        batch: list[AppendRequest],
        working: dict[str, _WorkingStream],
        outcomes: list[AppendResult | ApiError],
    ) -> None:
        """After the commit: wake readers, then answer every request."""
        for stream in working.values():
            if stream.changed:
                self._hub.publish(
                    stream.meta.path,
                    stream.meta.tail,
                    stream.new_messages,
                    stream.tail,
                    stream.closed,
                )
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, ApiError):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)


def _stored_state(
    stored: dict[tuple[int, str], tuple[int, int]], stream_id: int, producer_id: str
) -> ProducerState | None:
    found = stored.get((stream_id, producer_id))
    return ProducerState(*found) if found else None


def _apply(request: AppendRequest, stream: _WorkingStream | None) -> AppendResult:
    """One append against the batch's view of its stream, in the order of spec/01 §A.5
    steps 5-11. Changes only the working copy."""
    if stream is None or stream.meta.presence is Presence.MISSING:
        raise ApiError(404, "STREAM_NOT_FOUND", "Stream not found")
    if stream.meta.presence is Presence.GONE:
        raise ApiError(410, "STREAM_GONE", "Stream has been deleted")
    stream.touched = True
    producer = request.producer
    close_only = request.close and not request.body
    if stream.closed:
        return _closed_stream_outcome(request, stream)
    if not close_only and media_type(request.content_type) != media_type(stream.meta.content_type):
        raise ApiError(409, "CONTENT_TYPE_MISMATCH", "Content-Type does not match the stream")
    next_state: ProducerState | None = None
    if producer is not None:
        pid = producer.producer_id
        state = stream.producer_updates.get(pid) or stream.producers.get(pid)
        outcome, next_state = check_producer(producer, state)
        if outcome is ProducerOutcome.DUPLICATE:
            return AppendResult(
                204,
                {
                    "Stream-Next-Offset": format_offset(stream.tail),
                    "Producer-Epoch": str(producer.epoch),
                    "Producer-Seq": str(next_state.last_seq),
                },
            )
    if (
        request.stream_seq is not None
        and stream.last_stream_seq is not None
        and request.stream_seq <= stream.last_stream_seq
    ):
        raise ApiError(409, "SEQUENCE_CONFLICT", "Stream-Seq must increase")
    if not close_only:
        if request.json_error is not None:
            raise request.json_error
        if request.json_batch is not None:
            offset = stream.tail + request.json_batch.size + MESSAGE_OVERHEAD
            data = request.json_batch.encode(offset)
        else:
            offset = stream.tail + len(request.body) + MESSAGE_OVERHEAD
            data = request.body
        stream.new_messages.append(Message(offset, data))
        stream.tail = offset
    if request.stream_seq is not None:
        stream.last_stream_seq = request.stream_seq
    headers = {"Stream-Next-Offset": format_offset(stream.tail)}
    if request.close:
        stream.closed = True
        headers["Stream-Closed"] = "true"
        if producer is not None:
            stream.closed_by = (producer.producer_id, producer.epoch, producer.seq)
    if producer is not None and next_state is not None:
        stream.producer_updates[producer.producer_id] = next_state
        headers["Producer-Epoch"] = str(next_state.epoch)
        headers["Producer-Seq"] = str(next_state.last_seq)
        # An accepted producer append is a 200; a close-only request stays a 204.
        return AppendResult(204 if close_only else 200, headers)
    return AppendResult(204, headers)


def _closed_stream_outcome(request: AppendRequest, stream: _WorkingStream) -> AppendResult:
    """An append or close against a closed stream (spec/01 §A.5 step 6, §A.7)."""
    headers = {"Stream-Next-Offset": format_offset(stream.tail), "Stream-Closed": "true"}
    producer = request.producer
    if producer is not None:
        if stream.closed_by == (producer.producer_id, producer.epoch, producer.seq):
            headers["Producer-Epoch"] = str(producer.epoch)
            headers["Producer-Seq"] = str(producer.seq)
            return AppendResult(204, headers)
    elif request.close and not request.body:
        return AppendResult(204, headers)
    raise ApiError(409, "STREAM_CLOSED", "Stream is closed", headers=headers)

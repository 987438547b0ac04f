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
from dataclasses import dataclass, field

import asyncpg

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

log = logging.getLogger(__name__)

# A batch stops growing at this many requests or bytes; the rest waits for the next one.
MAX_BATCH_REQUESTS = 1024
MAX_BATCH_BYTES = 32 * 1024 * 1024


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
    """A locked stream's state as the batch changes it."""

    meta: StreamMeta
    tail: int
    closed: bool
    closed_by: tuple[str, int, int] | None
    last_stream_seq: str | None
    touched: bool = False
    new_messages: list[Message] = field(default_factory=list)


class AppendWriter:
    def __init__(self, pool: asyncpg.Pool, hub: StreamHub) -> None:
        self._pool = pool
        self._hub = hub
        self._queue: list[AppendRequest] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="append-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(
                    ApiError(503, "SERVER_STOPPING", "Server is shutting down")
                )
        self._queue.clear()

    async def submit(self, request: AppendRequest) -> AppendResult:
        self._queue.append(request)
        self._wakeup.set()
        return await request.future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take_batch()
                try:
                    await self._commit(batch)
                except asyncio.CancelledError:
                    self._fail(batch, ApiError(503, "SERVER_STOPPING", "Server is shutting down"))
                    raise
                except Exception:
                    log.exception("append batch of %d failed", len(batch))
                    self._fail(batch, ApiError(503, "STORAGE_UNAVAILABLE", "Append failed"))

    def _take_batch(self) -> list[AppendRequest]:
        size = 0
        count = 0
        for request in self._queue:
            if count and (
                count >= MAX_BATCH_REQUESTS or size + len(request.body) > MAX_BATCH_BYTES
            ):
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

    async def _commit(self, batch: list[AppendRequest]) -> None:
        outcomes: list[AppendResult | ApiError] = []
        async with self._pool.acquire() as conn, conn.transaction():
            paths = sorted({r.path for r in batch})
            metas = await store.lock_metas(conn, paths)
            working = {
                path: _WorkingStream(
                    meta=meta,
                    tail=meta.tail,
                    closed=meta.closed,
                    closed_by=(
                        (
                            meta.closed_by_producer,
                            meta.closed_by_epoch or 0,
                            meta.closed_by_seq or 0,
                        )
                        if meta.closed_by_producer is not None
                        else None
                    ),
                    last_stream_seq=meta.last_stream_seq,
                )
                for path, meta in metas.items()
            }
            producers = await self._load_producers(conn, batch, metas)
            producer_updates: dict[tuple[int, str], ProducerState] = {}
            for request in batch:
                stream = working.get(request.path)
                try:
                    outcomes.append(self._apply(request, stream, producers, producer_updates))
                except ApiError as error:
                    outcomes.append(error)
            await self._write(conn, working, producer_updates)
        self._publish(working)
        for request, outcome in zip(batch, outcomes, strict=True):
            if request.future.done():
                continue
            if isinstance(outcome, ApiError):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    @staticmethod
    async def _load_producers(
        conn: asyncpg.Connection, batch: list[AppendRequest], metas: dict[str, StreamMeta]
    ) -> dict[tuple[int, str], ProducerState]:
        keys = {
            (metas[r.path].id, r.producer.producer_id)
            for r in batch
            if r.producer is not None and r.path in metas
        }
        if not keys:
            return {}
        ids, pids = zip(*keys, strict=True)
        rows = await store.fetch_producers(conn, list(ids), list(pids))
        return {key: ProducerState(epoch, seq) for key, (epoch, seq) in rows.items()}

    @staticmethod
    def _apply(
        request: AppendRequest,
        stream: _WorkingStream | None,
        producers: dict[tuple[int, str], ProducerState],
        producer_updates: dict[tuple[int, str], ProducerState],
    ) -> AppendResult:
        """One append against the locked state, in the order of spec/01 §A.5 steps 5-11."""
        if stream is None or stream.meta.presence is Presence.MISSING:
            raise ApiError(404, "STREAM_NOT_FOUND", "Stream not found")
        if stream.meta.presence is Presence.GONE:
            raise ApiError(410, "STREAM_GONE", "Stream has been deleted")
        stream.touched = True
        producer = request.producer
        close_only = request.close and not request.body
        if stream.closed:
            return _closed_stream_outcome(request, stream)
        if not close_only and media_type(request.content_type) != media_type(
            stream.meta.content_type
        ):
            raise ApiError(409, "CONTENT_TYPE_MISMATCH", "Content-Type does not match the stream")
        key = (stream.meta.id, producer.producer_id) if producer else None
        next_state: ProducerState | None = None
        if producer is not None and key is not None:
            state = producer_updates.get(key) or producers.get(key)
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
        if producer is not None and key is not None and next_state is not None:
            producer_updates[key] = next_state
            headers["Producer-Epoch"] = str(next_state.epoch)
            headers["Producer-Seq"] = str(next_state.last_seq)
            # An accepted producer append is a 200; a close-only request stays a 204.
            return AppendResult(204 if close_only else 200, headers)
        return AppendResult(204, headers)

    async def _write(
        self,
        conn: asyncpg.Connection,
        working: dict[str, _WorkingStream],
        producer_updates: dict[tuple[int, str], ProducerState],
    ) -> None:
        touched = [s for s in working.values() if s.touched]
        message_ids: list[int] = []
        offsets: list[int] = []
        datas: list[bytes] = []
        for stream in touched:
            for message in stream.new_messages:
                message_ids.append(stream.meta.id)
                offsets.append(message.offset)
                datas.append(message.data)
        await store.insert_messages(conn, message_ids, offsets, datas)
        if touched:
            await store.update_stream_tails(
                conn,
                [s.meta.id for s in touched],
                [s.tail for s in touched],
                [s.closed for s in touched],
                [s.closed_by[0] if s.closed_by else None for s in touched],
                [s.closed_by[1] if s.closed_by else None for s in touched],
                [s.closed_by[2] if s.closed_by else None for s in touched],
                [s.last_stream_seq for s in touched],
            )
        if producer_updates:
            keys = list(producer_updates)
            await store.upsert_producers(
                conn,
                [k[0] for k in keys],
                [k[1] for k in keys],
                [producer_updates[k].epoch for k in keys],
                [producer_updates[k].last_seq for k in keys],
            )
        changed = [
            (s.meta.path, s.tail, s.closed)
            for s in touched
            if s.new_messages or s.closed != s.meta.closed
        ]
        for payload in self._hub.notify_payloads(changed, []):
            await store.notify(conn, CHANNEL, payload)

    def _publish(self, working: dict[str, _WorkingStream]) -> None:
        for stream in working.values():
            if stream.new_messages or stream.closed != stream.meta.closed:
                self._hub.publish(
                    stream.meta.path,
                    stream.meta.tail,
                    stream.new_messages,
                    stream.tail,
                    stream.closed,
                )


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

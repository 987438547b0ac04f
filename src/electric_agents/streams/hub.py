"""Waking live readers (long-poll, SSE) when a stream changes, without polling.

In this process the writer publishes each committed batch directly. Other processes on the
same database learn of it through LISTEN/NOTIFY on one channel. A `Watch` exists only while
someone waits on a stream, so idle streams cost no memory; it keeps the newest messages the
local writer committed so that many readers following one stream are served without a query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import asyncpg

from electric_agents.streams.model import Message

log = logging.getLogger(__name__)


class Follower(Protocol):
    """A reader written to straight from the commit that published a change (SSE fan-out),
    instead of being woken to read it. It is dropped as soon as it declines a change, and
    then reads like any other waiter."""

    def deliver(self, prev_tail: int, messages: list[Message], tail: int, closed: bool) -> bool:
        """Take a committed change; False (and nothing written) if it cannot."""
        ...

    def stop(self) -> None:
        """No more changes will be delivered (the watch went stale)."""
        ...


CHANNEL = "ds_stream_changes"
_RECENT_MAX_MESSAGES = 256
_RECENT_MAX_BYTES = 4 * 1024 * 1024
_NOTIFY_PAYLOAD_LIMIT = 7000


@dataclass(frozen=True)
class StreamChange:
    """A committed change to a stream, as told to change listeners (local or remote)."""

    kind: Literal["append", "created", "deleted"]
    path: str
    tail: int = 0
    closed: bool = False


ChangeListener = Callable[[StreamChange], None]


class Watch:
    """What this process knows about one watched stream's tail."""

    def __init__(self) -> None:
        # -1 until a reader reports what it read from the database.
        self.tail = -1
        self.closed = False
        self.stale = False
        self.waiters = 0
        self._changed = asyncio.Event()
        # Messages known to follow `recent_start` contiguously, up to `tail`.
        self.recent: deque[Message] = deque()
        self.recent_start = -1
        self._recent_bytes = 0
        self.followers: list[Follower] = []

    def observe(self, tail: int, closed: bool) -> None:
        """Fold in state read from the database after this watch was registered."""
        if tail > self.tail:
            self.recent.clear()
            self._recent_bytes = 0
            self.recent_start = tail
            self.tail = tail
        self.closed = self.closed or closed

    def messages_after(self, offset: int) -> list[Message] | None:
        """The cached messages after `offset`, or None if the cache cannot answer."""
        if self.recent_start < 0 or offset < self.recent_start or offset > self.tail:
            return None
        # Readers are usually at or near the tail: walk back from the newest message.
        after: list[Message] = []
        for message in reversed(self.recent):
            if message.offset <= offset:
                break
            after.append(message)
        after.reverse()
        return after

    async def wait(self, timeout: float) -> bool:
        """Wait for the next change; False on timeout."""
        # asyncio.timeout, unlike wait_for, makes no task per wait (100 SSE readers on one
        # stream wait once per message each).
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def _fire(self) -> None:
        # Wake everyone waiting now, and arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def mark_stale(self) -> None:
        """Deleted, or notifications were interrupted: every reader re-checks the database."""
        self.stale = True
        self.release_readers()

    def release_readers(self) -> None:
        """Followers are no longer written to and every waiting reader wakes."""
        followers, self.followers = self.followers, []
        for follower in followers:
            follower.stop()
        self._fire()

    def _apply(self, prev_tail: int, messages: list[Message], tail: int, closed: bool) -> None:
        if messages and prev_tail == self.tail:
            for message in messages:
                self.recent.append(message)
                self._recent_bytes += len(message.data)
            while self.recent and (
                len(self.recent) > _RECENT_MAX_MESSAGES or self._recent_bytes > _RECENT_MAX_BYTES
            ):
                dropped = self.recent.popleft()
                self._recent_bytes -= len(dropped.data)
                self.recent_start = dropped.offset
        elif tail > self.tail:
            # A change we have no bytes for: the cache only answers from the new tail on.
            self.recent.clear()
            self._recent_bytes = 0
            self.recent_start = tail
        self.tail = max(self.tail, tail)
        self.closed = self.closed or closed
        if self.followers:
            self.followers = [
                f for f in self.followers if _hand_over(f, prev_tail, messages, tail, closed)
            ]
        self._fire()


def _hand_over(
    follower: Follower, prev_tail: int, messages: list[Message], tail: int, closed: bool
) -> bool:
    """Deliver a change to one follower; a follower that fails is dropped (its reader's
    task takes over), never the commit that publishes."""
    try:
        return follower.deliver(prev_tail, messages, tail, closed)
    except Exception:
        log.exception("stream follower failed; its reader reads for itself")
        follower.stop()
        return False


class StreamHub:
    def __init__(self) -> None:
        self.instance_id = uuid.uuid4().hex[:12]
        # Keyed by stream path: a reader registers before it reads the stream's row, so no
        # commit can fall between its read and its registration.
        self._watches: dict[str, Watch] = {}
        self._listener: asyncpg.Connection | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._database_url = ""
        self._change_listeners: list[ChangeListener] = []
        # Set when the server stops: live reads return at once instead of waiting.
        self.ending = False

    def add_change_listener(self, listener: ChangeListener) -> None:
        """Call `listener` for every committed append, close, create and delete, from this
        process or another one on the same database. Listeners must not block."""
        self._change_listeners.append(listener)

    def _tell(self, change: StreamChange) -> None:
        for listener in self._change_listeners:
            try:
                listener(change)
            except Exception:
                log.exception("stream change listener failed for %s", change.path)

    @contextlib.contextmanager
    def watch(self, path: str) -> Iterator[Watch]:
        """Register interest in a stream for the duration of a live read."""
        watch = self._watches.get(path)
        if watch is None:
            watch = self._watches[path] = Watch()
        watch.waiters += 1
        try:
            yield watch
        finally:
            watch.waiters -= 1
            if watch.waiters == 0 and self._watches.get(path) is watch:
                del self._watches[path]

    def publish(
        self, path: str, prev_tail: int, messages: list[Message], tail: int, closed: bool
    ) -> None:
        """A commit changed a stream."""
        watch = self._watches.get(path)
        if watch is not None:
            watch._apply(prev_tail, messages, tail, closed)
        self._tell(StreamChange("append", path, tail, closed))

    def publish_created(self, path: str) -> None:
        self._tell(StreamChange("created", path))

    def publish_deleted(self, path: str) -> None:
        watch = self._watches.get(path)
        if watch is not None:
            watch.mark_stale()
        self._tell(StreamChange("deleted", path))

    # Cross-process notifications -------------------------------------------------------

    def notify_payloads(
        self,
        changes: list[tuple[str, int, bool]],
        deleted: list[str],
        created: list[str] | None = None,
    ) -> list[str]:
        """NOTIFY payloads: `<instance> <tail>:<closed>:<path> ... -:<path> ... +:<path>`.

        Paths never contain spaces as received (they are percent-encoded), so space splits.
        """
        items = [f"{tail}:{int(closed)}:{path}" for path, tail, closed in changes]
        items += [f"-:{path}" for path in deleted]
        items += [f"+:{path}" for path in created or []]
        payloads: list[str] = []
        current: list[str] = []
        size = 0
        for item in items:
            if size + len(item) > _NOTIFY_PAYLOAD_LIMIT and current:
                payloads.append(f"{self.instance_id} {' '.join(current)}")
                current, size = [], 0
            current.append(item)
            size += len(item) + 1
        if current:
            payloads.append(f"{self.instance_id} {' '.join(current)}")
        return payloads

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        origin, _, body = payload.partition(" ")
        if origin == self.instance_id:
            return
        for item in body.split():
            try:
                if item.startswith("-:"):
                    self.publish_deleted(item[2:])
                    continue
                if item.startswith("+:"):
                    self.publish_created(item[2:])
                    continue
                tail, closed, path = item.split(":", 2)
                self.publish(path, -1, [], int(tail), closed == "1")
            except ValueError:
                log.warning("ignoring malformed stream notification %r", item)

    async def start(self, database_url: str) -> None:
        self._database_url = database_url
        await self._listen()
        self._keeper = asyncio.create_task(self._keep_listening(), name="stream-hub-listener")

    async def _listen(self) -> None:
        self._listener = await asyncpg.connect(self._database_url)
        await self._listener.add_listener(CHANNEL, self._on_notification)

    async def _keep_listening(self) -> None:
        """Reconnect a dropped LISTEN connection. Changes missed meanwhile are not lost to
        readers: each live wait re-reads the stream when its timeout ends."""
        while True:
            await asyncio.sleep(1.0)
            if self._listener is not None and not self._listener.is_closed():
                continue
            try:
                await self._listen()
                self._wake_all()
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("stream change listener cannot reconnect yet: %s", error)

    def end_live_reads(self) -> None:
        """The server is stopping: every live read returns now, as if its wait had timed
        out, so connections close without waiting out the graceful-shutdown timeout."""
        self.ending = True
        for watch in self._watches.values():
            watch.release_readers()

    def _wake_all(self) -> None:
        # After a gap in notifications, let every live reader re-check the database.
        for watch in self._watches.values():
            watch.mark_stale()

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None

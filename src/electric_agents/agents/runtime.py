"""The agents runtime: what every agents module needs, built once at startup.

Feature modules keep their own state on objects they create from this runtime and register
their background workers here, so startup and shutdown stay in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import httpx

from electric_agents.agents.entity_types import ensure_principal_type
from electric_agents.config import Settings
from electric_agents.streams.engine import StreamEngine

log = logging.getLogger(__name__)

Worker = Callable[[], Awaitable[None]]


class AgentsRuntime:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, engine: StreamEngine) -> None:
        self.settings = settings
        self.pool = pool
        self.engine = engine
        self.tenant_id = settings.tenant_id
        self.public_url = settings.public_url
        # For calls the server makes itself (handlers, serve endpoints); never follows
        # redirects, so a handler cannot bounce us to another address.
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), follow_redirects=False)
        self._workers: list[tuple[str, Worker]] = []
        # Set by the app when a subscription service runs: dispatch linking tells its
        # delivery worker that a subscription now exists (see dispatch_links).
        self.on_subscription_created: Callable[[], None] | None = None
        # Called with the path of every stream GET/HEAD outside `/_electric` (entity
        # bridges use it to see which membership streams are being read).
        self.read_observers: list[Callable[[str], None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Called when the server starts stopping, to end requests that wait for changes.
        self.live_request_enders: list[Callable[[], None]] = []

    def end_live_requests(self) -> None:
        for end in self.live_request_enders:
            end()

    def add_worker(self, name: str, worker: Worker) -> None:
        """Run `worker` (a long-lived coroutine) from startup until shutdown."""
        self._workers.append((name, worker))

    async def start(self) -> None:
        await ensure_principal_type(self)
        for name, worker in self._workers:
            self._tasks.append(asyncio.create_task(self._supervise(name, worker), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.http.aclose()

    @staticmethod
    async def _supervise(name: str, worker: Worker) -> None:
        # A worker that crashes is restarted after a pause instead of silently stopping.
        while True:
            try:
                await worker()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agents worker %s failed; restarting in 1 s", name)
                await asyncio.sleep(1.0)


async def drain_when_nudged(
    drain: Callable[[], Awaitable[object]],
    nudged: asyncio.Event,
    *,
    poll_s: float,
    error_pause_s: float,
    what: str,
) -> None:
    """A queue-draining worker's loop: drain, then wait until `nudged` is set (work queued
    in this process, or a NOTIFY from another) or `poll_s` passes, and drain again. A
    database error is logged and retried after `error_pause_s`."""
    while True:
        try:
            await drain()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning("%s failed, retrying: %s", what, error)
            await asyncio.sleep(error_pause_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nudged.wait(), poll_s)
        nudged.clear()

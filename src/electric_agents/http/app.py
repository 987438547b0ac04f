"""The ASGI application: one object built at startup that owns the pool, the stream engine
and the background workers, started and stopped in the ASGI lifespan."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from electric_agents.agents.mock_agent import MockChatAgent
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.stream_policy import EntityStreamPolicy
from electric_agents.agents.wake_dispatch import EntityWebhookForwarder
from electric_agents.config import Settings
from electric_agents.db.pool import open_pool
from electric_agents.errors import ApiError
from electric_agents.http.agents_app import AgentsApp
from electric_agents.http.responses import Receive, Scope, Send, send_error, send_json
from electric_agents.http.streams_app import StreamsApp
from electric_agents.http.subscriptions_app import SubscriptionsApp
from electric_agents.streams.engine import StreamEngine
from electric_agents.streams.subscription_service import SubscriptionService

log = logging.getLogger(__name__)

# Postgres cannot store a NUL character in text or jsonb: a client's string with "\u0000"
# fails the write (22021 for text parameters, 22P05 for jsonb). The write's transaction is
# rolled back, so this is the client's 400, not our 500.
UNSTORABLE_TEXT_SQLSTATES = frozenset({"22021", "22P05"})
_INTERNAL_ERROR = ApiError(500, "INTERNAL_SERVER_ERROR", "Internal server error")


def _storage_error(error: asyncpg.DataError) -> ApiError:
    if error.sqlstate in UNSTORABLE_TEXT_SQLSTATES:
        return ApiError(
            400, "INVALID_REQUEST", "Request text contains a NUL character, which cannot be stored"
        )
    return _INTERNAL_ERROR


class ServerApp:
    """`serve` mounts streams at the root; `streams` mounts them at `/v1/stream`."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.database_url = database_url
        self.pool: asyncpg.Pool | None = None
        self.engine: StreamEngine | None = None
        self.streams_app: StreamsApp | None = None
        self.subscriptions: SubscriptionService | None = None
        self.agents: AgentsRuntime | None = None
        self.agents_app: AgentsApp | None = None
        self.mock_agent: MockChatAgent | None = None
        self.ready = False
        # Called once the server accepts requests (the CLI prints its banner here).
        self.on_ready: Callable[[], None] | None = None

    async def startup(self) -> None:
        self.pool = await open_pool(self.database_url)
        self.engine = StreamEngine(self.pool, self.database_url)
        await self.engine.start()
        control_app = None
        if self.serves_agents:
            self.agents = AgentsRuntime(self.settings, self.pool, self.engine)
        if self.settings.subscriptions:
            # Under `serve` the stream root is the public root, so `/__ds/...` is at the
            # root, and entity wakes are enriched in process (spec/02 §4.5).
            self.subscriptions = SubscriptionService(
                self.engine,
                public_root=self.settings.public_url + self.settings.stream_prefix,
                database_url=self.database_url,
                forwarder=EntityWebhookForwarder(self.agents) if self.agents else None,
            )
            await self.subscriptions.start()
            if self.agents is not None:
                self.agents.on_subscription_created = self.subscriptions.worker.subscription_created
            control_app = SubscriptionsApp(self.subscriptions, prefix=self.settings.stream_prefix)
        append_policy: EntityStreamPolicy | None = None
        if self.agents is not None:
            if self.settings.mock_agent and self.subscriptions is not None:
                self.mock_agent = MockChatAgent(self.agents, self.subscriptions.signer)
            # Built before the stream app: entity stream appends go through its policy.
            self.agents_app = AgentsApp(self.agents, self.subscriptions, self.mock_agent)
            append_policy = EntityStreamPolicy(self.agents)
        self.streams_app = StreamsApp(
            self.engine,
            prefix=self.settings.stream_prefix,
            long_poll_timeout_s=self.settings.long_poll_timeout_ms / 1000,
            max_append_bytes=self.settings.max_append_bytes,
            control_app=control_app,
            append_policy=append_policy,
        )
        if self.agents is not None:
            await self.agents.start()
        if self.mock_agent is not None:
            await self.mock_agent.start()
        self.ready = True
        if self.on_ready is not None:
            self.on_ready()

    @property
    def serves_agents(self) -> bool:
        """`serve` runs the agents control plane; `streams` is the stream engine alone."""
        return self.settings.stream_prefix == ""

    async def begin_stopping(self) -> None:
        """The server is about to stop and still listens. Requests waiting for changes
        (long-poll and SSE reads, live shape requests) answer now, so their connections can
        close without waiting out the graceful-shutdown timeout; the in-process mock agent
        finishes its wakes now, because its callbacks to this server need the listener."""
        if self.engine is not None:
            self.engine.hub.end_live_reads()
        if self.agents is not None:
            self.agents.end_live_requests()
        if self.mock_agent is not None:
            await self.mock_agent.stop()

    async def shutdown(self) -> None:
        self.ready = False
        if self.mock_agent is not None:
            await self.mock_agent.stop()  # before the runtime's http client closes (again:
            # begin_stopping ran it unless the server stopped another way)
        if self.agents is not None:
            await self.agents.stop()
        if self.subscriptions is not None:
            await self.subscriptions.stop()
        if self.engine is not None:
            await self.engine.stop()
        if self.pool is not None:
            await self.pool.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if not self.ready or self.streams_app is None:
            await send_error(send, ApiError(503, "SERVER_STARTING", "Server is not ready"))
            return
        path: str = scope["path"]
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if path.startswith("/_electric/shared-state/"):
                # Shared-state streams behave like streams (spec/02 §2.2).
                await self.streams_app(scope, receive, tracking_send)
            elif path.startswith("/_electric/") or path == "/_electric":
                await self._electric(scope, receive, tracking_send, path)
            else:
                if self.agents is not None and scope["method"] in ("GET", "HEAD"):
                    for observe in self.agents.read_observers:
                        observe(path)
                await self.streams_app(scope, receive, tracking_send)
        except asyncpg.DataError as error:
            if error.sqlstate not in UNSTORABLE_TEXT_SQLSTATES:
                log.exception("unhandled error on %s %s", scope["method"], path)
            if not started:
                await send_error(send, _storage_error(error))
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], path)
            if not started:
                await send_error(send, _INTERNAL_ERROR)

    def direct_append_path(self, raw_path: bytes) -> str | None:
        """The stream a POST to `raw_path` appends to, when `__call__` would route it to
        the stream app as a plain append (http/direct.py answers those itself)."""
        if raw_path == b"/_electric" or raw_path.startswith(b"/_electric/"):
            return None
        assert self.streams_app is not None
        return self.streams_app.appendable_path(raw_path.decode("latin-1"))

    async def _electric(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if self.agents_app is not None:
            await self.agents_app(scope, receive, send)
            return
        if path.rstrip("/") == "/_electric/health" and scope["method"] in ("GET", "HEAD"):
            await send_json(send, 200, {"status": "ok"})
            return
        await send_error(send, ApiError(404, "NOT_FOUND", "Not found"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: dict[str, Any] = dict(await receive())
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.error("startup failed: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

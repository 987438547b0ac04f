"""The subscription control API's operations (spec/01 §A.19), on plain values: create or
confirm, read, delete, link and unlink streams, and the consumer side of a wake (callback,
claim, ack, release). The HTTP layer parses requests into these calls; the delivery worker
does everything that happens in the background."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from electric_agents.errors import ApiError, bad_request
from electric_agents.streams import subscription_store as store
from electric_agents.streams import wake_store, wakes
from electric_agents.streams.delivery import DeliveryWorker, WebhookForwarder
from electric_agents.streams.engine import StreamEngine
from electric_agents.streams.signing import CallbackTokens, WebhookSigner
from electric_agents.streams.subscriptions import StreamLink, Subscription, SubscriptionConfig
from electric_agents.streams.wakes import Ack


@dataclass(frozen=True)
class WakeReport:
    """A consumer's callback or ack: acks, and whether it is done with the wake."""

    wake_id: str | None
    generation: int | None
    acks: list[Ack]
    done: bool


def not_found() -> ApiError:
    return ApiError(404, "SUBSCRIPTION_NOT_FOUND", "Subscription not found")


class SubscriptionService:
    def __init__(
        self,
        engine: StreamEngine,
        *,
        public_root: str,
        database_url: str,
        forwarder: WebhookForwarder | None = None,
    ) -> None:
        self._engine = engine
        self._forwarder = forwarder
        self._pool = engine.pool
        self._public_root = public_root.rstrip("/")
        self._database_url = database_url
        self._signer: WebhookSigner | None = None
        self._tokens: CallbackTokens | None = None
        self._worker: DeliveryWorker | None = None

    async def start(self) -> None:
        self._signer = await WebhookSigner.load_or_create(self._pool)
        self._tokens = await CallbackTokens.load_or_create(self._pool)
        self._worker = DeliveryWorker(
            self._engine,
            self._signer,
            self._tokens,
            public_root=self._public_root,
            database_url=self._database_url,
            forwarder=self._forwarder,
        )
        await self._worker.start()

    async def stop(self) -> None:
        if self._worker is not None:
            await self._worker.stop()

    @property
    def signer(self) -> WebhookSigner:
        assert self._signer is not None, "SubscriptionService.start() was not called"
        return self._signer

    @property
    def tokens(self) -> CallbackTokens:
        assert self._tokens is not None, "SubscriptionService.start() was not called"
        return self._tokens

    @property
    def worker(self) -> DeliveryWorker:
        assert self._worker is not None, "SubscriptionService.start() was not called"
        return self._worker

    def jwks(self) -> dict[str, Any]:
        return self.signer.jwks()

    def signing_info(self) -> dict[str, str]:
        return {
            "alg": "ed25519",
            "kid": self.signer.kid,
            "jwks_url": f"{self._public_root}/__ds/jwks.json",
        }

    # Subscriptions ----------------------------------------------------------------------

    async def create_or_confirm(
        self, subscription_id: str, config: SubscriptionConfig
    ) -> tuple[bool, dict[str, Any]]:
        """(created, document): 201 for a new one, 200 for the same configuration again,
        409 for a different one."""
        async with self._pool.acquire() as conn, conn.transaction():
            subscription = await store.insert_subscription(conn, subscription_id, config)
            created = subscription is not None
            if subscription is None:
                subscription = await store.get_subscription(conn, subscription_id)
                if subscription is None:
                    # Deleted between our insert and read: let the client try again.
                    raise ApiError(409, "SUBSCRIPTION_CONFLICT", "Subscription changed, retry")
                if subscription.config_hash != config.config_hash():
                    raise ApiError(
                        409,
                        "SUBSCRIPTION_ALREADY_EXISTS",
                        "Subscription already exists with different configuration",
                    )
            else:
                if config.streams:
                    await store.link_explicit(conn, subscription_id, list(config.streams))
                if config.pattern is not None:
                    await store.link_existing_matches(
                        conn, subscription_id, config.pattern, config.wake_stream
                    )
            links = await store.list_links(conn, subscription_id)
        if created:
            self.worker.subscription_created()
        return created, self._document(subscription, links)

    async def get(self, subscription_id: str) -> dict[str, Any]:
        async with self._pool.acquire() as conn:
            subscription = await store.get_subscription(conn, subscription_id)
            if subscription is None:
                raise not_found()
            links = await store.list_links(conn, subscription_id)
        return self._document(subscription, links)

    async def delete(self, subscription_id: str) -> None:
        """Deleting also ends any outstanding wake: its callbacks then get a 404."""
        async with self._pool.acquire() as conn:
            await store.delete_subscription(conn, subscription_id)

    async def add_streams(self, subscription_id: str, paths: list[str]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            if await store.get_subscription(conn, subscription_id, for_update=True) is None:
                raise not_found()
            await store.link_explicit(conn, subscription_id, paths)

    async def remove_stream(self, subscription_id: str, path: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            if await store.get_subscription(conn, subscription_id, for_update=True) is None:
                raise not_found()
            await store.unlink_explicit(conn, subscription_id, path)

    def _document(self, subscription: Subscription, links: list[StreamLink]) -> dict[str, Any]:
        signing = self.signing_info() if subscription.type == "webhook" else None
        return subscription.document(links, signing)

    # The consumer side of a wake --------------------------------------------------------

    async def callback(
        self,
        subscription_id: str,
        token: str,
        report: WakeReport,
        *,
        after_done: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """A webhook consumer's acks, heartbeat or done; returns whether a next wake opened.
        `after_done` runs once a done has committed and before the next wake is delivered
        (the agents layer ends the entity's run there, so the next wake's start follows)."""
        return await self._report(
            subscription_id, token, report, pull_wake_only=False, after_done=after_done
        )

    async def ack(
        self,
        subscription_id: str,
        token: str,
        report: WakeReport,
        *,
        after_done: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """A pull-wake worker's acks, heartbeat or done; returns whether a next wake opened.
        `after_done` as for `callback`."""
        return await self._report(
            subscription_id, token, report, pull_wake_only=True, after_done=after_done
        )

    async def _report(
        self,
        subscription_id: str,
        token: str,
        report: WakeReport,
        *,
        pull_wake_only: bool,
        after_done: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        async with self._pool.acquire() as conn, conn.transaction():
            subscription = await self._locked(conn, subscription_id, pull_wake_only)
            claims = self.tokens.verify(token, subscription_id)
            wake = wakes.check_fence(subscription, claims, report.wake_id, report.generation)
            await wakes.apply_acks(conn, subscription, wake, report.acks)
            opened = None
            if report.done:
                opened = await wakes.finish_wake(conn, subscription, self.worker.lease)
            else:
                # Every accepted call renews the consumer's lease (a heartbeat).
                await wake_store.extend_lease(conn, subscription_id, subscription.lease_ttl_ms)
        if report.done and after_done is not None:
            await after_done()
        if opened is not None:
            self.worker.dispatch(opened)
        self.worker.kick()
        return opened is not None

    async def claim(self, subscription_id: str, worker: str) -> dict[str, Any]:
        async with self._pool.acquire() as conn, conn.transaction():
            subscription = await self._locked(conn, subscription_id, pull_wake_only=True)
            claimed = await wakes.claim(conn, subscription, worker)
        wake = claimed.wake
        assert wake is not None
        self.worker.kick()
        return {
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "token": self.tokens.mint(subscription_id, wake.generation, wake.wake_id),
            "streams": [wake.stream_document()],
            "lease_ttl_ms": claimed.lease_ttl_ms,
        }

    async def release(
        self, subscription_id: str, token: str, wake_id: str | None, generation: int | None
    ) -> None:
        """Give a claimed wake back unfinished; pending work gets a new wake."""
        async with self._pool.acquire() as conn, conn.transaction():
            subscription = await self._locked(conn, subscription_id, pull_wake_only=True)
            claims = self.tokens.verify(token, subscription_id)
            wakes.check_fence(subscription, claims, wake_id, generation)
            opened = await wakes.finish_wake(conn, subscription, self.worker.lease)
        if opened is not None:
            self.worker.dispatch(opened)

    @staticmethod
    async def _locked(
        conn: asyncpg.Connection, subscription_id: str, pull_wake_only: bool
    ) -> Subscription:
        subscription = await store.get_subscription(conn, subscription_id, for_update=True)
        if subscription is None:
            raise not_found()
        if pull_wake_only and subscription.type != "pull-wake":
            raise bad_request("Subscription is not pull-wake")
        return subscription

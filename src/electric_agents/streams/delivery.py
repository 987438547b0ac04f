"""Delivering wakes: signed webhook POSTs and pull-wake events, with retries, lease expiry
and the sweeps that make pending work survive crashes.

Nothing here is the source of truth. Pending work is read from the database (a linked
stream whose tail is past its acknowledged offset) and a wake's delivery state lives on its
subscription row, so a wake missed by a crashed or busy process is found by the next sweep
of any process. Stream changes (local or from other processes via LISTEN/NOTIFY) only make
that happen sooner.

Two processes never attempt the same delivery at once: an attempt is taken by an atomic
UPDATE that sets a delivery lease (`FOR UPDATE SKIP LOCKED` when sweeping). Each process
holds a session advisory lock on its owner key while it runs, so when it dies its leases
are released at the next sweep rather than when they run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import asyncpg
import httpx
import orjson

from electric_agents.errors import ApiError
from electric_agents.streams import subscription_store as store
from electric_agents.streams import wake_store, wakes
from electric_agents.streams.engine import StreamEngine
from electric_agents.streams.hub import StreamChange
from electric_agents.streams.signing import CallbackTokens, WebhookSigner
from electric_agents.streams.subscriptions import Subscription, glob_match
from electric_agents.streams.wakes import DeliveryLease

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 10.0
# Longer than an attempt can take, so a live process never loses an attempt it is making.
ATTEMPT_LEASE_S = 30.0
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0
RETRY_JITTER = 0.2
MAX_CONCURRENT_ATTEMPTS = 128
MAX_RESPONSE_BYTES = 64 * 1024
# How often the sweeps run even if nothing asks for them.
SWEEP_INTERVAL_S = 2.0
# The schedule never polls faster than this, even when work is overdue (e.g. at capacity).
MIN_WAIT_S = 0.05
# Pattern subscriptions this young are checked for streams created while they were being set
# up (a create event handled before the subscription committed would miss it).
RECENT_SUBSCRIPTION_S = 60.0
SWEEP_BATCH = 200


class WebhookForwarder(Protocol):
    """What a layer above makes of a webhook wake before it is posted (the agents server
    enriches entity wakes, spec/02 §4.5). Kept as a hook so streams never import agents."""

    async def forward_body(
        self, subscription: Subscription, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The body to post instead of `payload`; None answers the wake `{"done":true}`
        without calling the handler."""
        ...

    async def forward_failed(self, subscription: Subscription, payload: dict[str, Any]) -> None:
        """The post of a forwarded body failed in transport."""
        ...


def retry_delay_s(failures: int, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Exponential backoff from 1 s to 60 s, ±20 % jitter (spec/01 §A.19)."""
    base = min(RETRY_BASE_S * 2 ** max(0, failures - 1), RETRY_MAX_S)
    return base * rng(1 - RETRY_JITTER, 1 + RETRY_JITTER)


class DeliveryWorker:
    def __init__(
        self,
        engine: StreamEngine,
        signer: WebhookSigner,
        tokens: CallbackTokens,
        *,
        public_root: str,
        database_url: str,
        forwarder: WebhookForwarder | None = None,
    ) -> None:
        self._engine = engine
        self._forwarder = forwarder
        self._pool = engine.pool
        self._signer = signer
        self._tokens = tokens
        self._public_root = public_root.rstrip("/")
        self._database_url = database_url
        # The advisory lock key that says "this process is alive" to the others.
        self.owner = secrets.randbits(62) + 1
        self._liveness: asyncpg.Connection | None = None
        self._http: httpx.AsyncClient | None = None
        self._appended: set[str] = set()
        self._created: set[str] = set()
        self._deleted: set[str] = set()
        self._changes = asyncio.Event()
        self._kick = asyncio.Event()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_ATTEMPTS)
        self._attempts: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._subscriptions_exist = True
        self._stopping = False

    @property
    def lease(self) -> DeliveryLease:
        """The hold this process takes on the first attempt of a wake it opens."""
        return DeliveryLease(self.owner, ATTEMPT_LEASE_S)

    async def start(self) -> None:
        self._liveness = await asyncpg.connect(self._database_url)
        await self._liveness.execute("SELECT pg_advisory_lock($1)", self.owner)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(WEBHOOK_TIMEOUT_S),
            limits=httpx.Limits(max_connections=MAX_CONCURRENT_ATTEMPTS),
            follow_redirects=False,
            # Webhook targets are explicit URLs; proxy settings of the environment must not
            # reroute them (a localhost receiver behind an HTTP proxy is unreachable).
            trust_env=False,
        )
        # Listen first, then catch up on what was created while no process was listening.
        self._engine.hub.add_change_listener(self.on_stream_change)
        await self._link_streams_created_since(created_within_s=None)
        self._loops = [
            asyncio.create_task(self._change_loop(), name="ds-subscription-changes"),
            asyncio.create_task(self._schedule_loop(), name="ds-subscription-schedule"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._loops, *self._attempts]:
            task.cancel()
        for task in [*self._loops, *self._attempts]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loops.clear()
        if self._http is not None:
            await self._http.aclose()
        if self._liveness is not None:
            # Closing the session releases the liveness lock: others may take our attempts.
            with contextlib.suppress(Exception):
                await self._liveness.close()

    def subscription_created(self) -> None:
        self._subscriptions_exist = True

    # Reacting to stream changes ---------------------------------------------------------

    def on_stream_change(self, change: StreamChange) -> None:
        """Called by the hub for every committed change; only records it."""
        if self._stopping:
            return
        if change.kind == "append":
            self._appended.add(change.path)
        elif change.kind == "created":
            self._created.add(change.path)
        else:
            self._deleted.add(change.path)
        self._changes.set()

    async def _change_loop(self) -> None:
        while True:
            await self._changes.wait()
            self._changes.clear()
            appended, created, deleted = self._appended, self._created, self._deleted
            self._appended, self._created, self._deleted = set(), set(), set()
            if not self._subscriptions_exist:
                continue
            try:
                await self._handle_changes(appended, created, deleted)
            except Exception:
                # The sweep finds whatever this missed.
                log.exception("handling stream changes for subscriptions failed")
                await asyncio.sleep(0.5)

    async def _handle_changes(
        self, appended: set[str], created: set[str], deleted: set[str]
    ) -> None:
        async with self._pool.acquire() as conn:
            if deleted:
                await store.unlink_deleted_streams(conn, sorted(deleted))
            if created:
                patterns = await store.pattern_subscriptions(conn)
                await store.link_created_streams(
                    conn,
                    [
                        (subscription_id, path)
                        for path in sorted(created)
                        for subscription_id, pattern, wake_stream in patterns
                        if path != wake_stream and glob_match(pattern, path)
                    ],
                )
            touched = sorted(appended | created)
            candidates = await store.idle_subscriptions_linked_to(conn, touched) if touched else []
        for subscription_id in candidates:
            await self.wake_if_pending(subscription_id)

    async def wake_if_pending(self, subscription_id: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            subscription = await store.get_subscription(conn, subscription_id, for_update=True)
            if subscription is None or subscription.wake is not None:
                return
            opened = await wakes.open_next_wake(conn, subscription, self.lease)
        if opened is not None:
            self.dispatch(opened)

    # The schedule: retries, lease expiry, sweeps ----------------------------------------

    def kick(self) -> None:
        self._kick.set()

    async def _schedule_loop(self) -> None:
        next_sweep = 0.0
        while True:
            wait_s = SWEEP_INTERVAL_S
            try:
                await self._expire_leases()
                await self._take_due_attempts()
                if time.monotonic() >= next_sweep:
                    await self._sweep()
                    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
                async with self._pool.acquire() as conn:
                    until = await wake_store.seconds_until_next_deadline(conn)
                if until is not None:
                    wait_s = min(max(until, MIN_WAIT_S), SWEEP_INTERVAL_S)
            except Exception:
                log.exception("subscription schedule pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), wait_s)
            self._kick.clear()

    async def _expire_leases(self) -> None:
        async with self._pool.acquire() as conn:
            expired = await wake_store.expired_lease_subscriptions(conn, SWEEP_BATCH)
        for subscription_id in expired:
            async with self._pool.acquire() as conn, conn.transaction():
                subscription = await store.get_subscription(conn, subscription_id, for_update=True)
                if subscription is None:
                    continue
                ended, opened = await wakes.expire_lease(conn, subscription, self.lease)
            if ended:
                log.info("wake lease expired for subscription %s", subscription_id)
            if opened is not None:
                self.dispatch(opened)

    async def _take_due_attempts(self) -> None:
        room = MAX_CONCURRENT_ATTEMPTS - len(self._attempts)
        if room <= 0:
            return
        async with self._pool.acquire() as conn:
            due = await wake_store.take_due_deliveries(conn, self.owner, ATTEMPT_LEASE_S, room)
        for subscription in due:
            self.dispatch(subscription)

    async def _sweep(self) -> None:
        async with self._pool.acquire() as conn:
            self._subscriptions_exist = await store.any_subscription_exists(conn)
            if not self._subscriptions_exist:
                return
            for owner in await wake_store.other_delivery_owners(conn, self.owner):
                released = await wake_store.release_if_owner_gone(conn, owner)
                if released:
                    log.warning("took over %d delivery attempts of a stopped process", released)
            idle = await store.idle_subscriptions_with_pending_work(conn, SWEEP_BATCH)
        await self._link_streams_created_since(created_within_s=RECENT_SUBSCRIPTION_S)
        for subscription_id in idle:
            await self.wake_if_pending(subscription_id)

    async def _link_streams_created_since(self, *, created_within_s: float | None) -> None:
        """Link streams created after a pattern subscription whose create event was missed
        (a crash, or a race with the subscription's own creation)."""
        async with self._pool.acquire() as conn:
            for subscription_id, pattern, _ in await store.pattern_subscriptions(
                conn, created_within_s=created_within_s
            ):
                missed = await store.unlinked_streams_created_since_subscription(
                    conn, subscription_id, pattern
                )
                if missed:
                    await store.link_created_streams(
                        conn, [(subscription_id, path) for path in missed]
                    )

    # Attempts ---------------------------------------------------------------------------

    def dispatch(self, subscription: Subscription) -> None:
        """Start attempting a wake this process holds the attempt lease for."""
        if self._stopping:
            return
        task = asyncio.create_task(self._attempt(subscription))
        self._attempts.add(task)
        task.add_done_callback(self._attempts.discard)

    async def _attempt(self, subscription: Subscription) -> None:
        queued_at = time.monotonic()
        async with self._slots:
            current: Subscription | None = subscription
            if time.monotonic() - queued_at > ATTEMPT_LEASE_S / 3:
                current = await self._renewed(subscription)
            while current is not None and not self._stopping:
                try:
                    if current.type == "webhook":
                        current = await self._post_webhook(current)
                    else:
                        current = await self._append_wake_event(current)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("delivery attempt failed for subscription %s", current.id)
                    return

    async def _renewed(self, subscription: Subscription) -> Subscription | None:
        """Still ours after waiting for a slot? (Then hold it for a full lease again.)"""
        assert subscription.wake is not None
        async with self._pool.acquire() as conn:
            held = await wake_store.renew_attempt(
                conn, subscription.id, subscription.wake.wake_id, self.owner, ATTEMPT_LEASE_S
            )
        return subscription if held else None

    def callback_url(self, subscription_id: str) -> str:
        encoded = quote(subscription_id, safe="!~*'()")
        return f"{self._public_root}/__ds/subscriptions/{encoded}/callback"

    async def _post_webhook(self, subscription: Subscription) -> Subscription | None:
        wake = subscription.wake
        assert wake is not None and subscription.webhook_url is not None and self._http
        payload: dict[str, Any] = {
            "subscription_id": subscription.id,
            "wake_id": wake.wake_id,
            "generation": wake.generation,
            "streams": [wake.stream_document()],
            "callback_url": self.callback_url(subscription.id),
            "callback_token": self._tokens.mint(subscription.id, wake.generation, wake.wake_id),
        }
        if self._forwarder is not None:
            forwarded = await self._forwarder.forward_body(subscription, payload)
            if forwarded is None:
                return await self._finish(subscription, ack_named_offset=wake.tail_offset)
            payload = forwarded
        body = orjson.dumps(payload)
        headers = {
            "content-type": "application/json",
            "webhook-signature": self._signer.signature_header(body),
        }
        try:
            async with asyncio.timeout(WEBHOOK_TIMEOUT_S):
                status, answer = await self._send(subscription.webhook_url, body, headers)
        except (httpx.HTTPError, TimeoutError, OSError) as error:
            if self._forwarder is not None:
                await self._forwarder.forward_failed(subscription, payload)
            return await self._failed(subscription, f"{type(error).__name__}: {error}")
        if not 200 <= status < 300:
            return await self._failed(subscription, f"webhook answered {status}")
        if _is_done(answer):
            # {"done":true}: the consumer processed what this wake named, up to its offset.
            return await self._finish(subscription, ack_named_offset=wake.tail_offset)
        async with self._pool.acquire() as conn:
            await wake_store.record_delivered(
                conn, subscription.id, wake.wake_id, subscription.lease_ttl_ms
            )
        self.kick()
        return None

    async def _send(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        assert self._http is not None
        async with self._http.stream("POST", url, content=body, headers=headers) as response:
            received = bytearray()
            async for chunk in response.aiter_bytes():
                received += chunk
                if len(received) > MAX_RESPONSE_BYTES:
                    break
            return response.status_code, bytes(received)

    async def _append_wake_event(self, subscription: Subscription) -> Subscription | None:
        wake = subscription.wake
        assert wake is not None and subscription.wake_stream is not None
        event = {
            "type": "wake",
            "subscription_id": subscription.id,
            "stream": wake.path,
            "generation": wake.generation,
            "ts": int(time.time() * 1000),
        }
        try:
            await self._engine.append(
                subscription.wake_stream, content_type="application/json", body=orjson.dumps(event)
            )
        except ApiError as error:
            return await self._failed(
                subscription, f"wake stream {subscription.wake_stream}: {error.message}"
            )
        async with self._pool.acquire() as conn:
            await wake_store.record_notified(conn, subscription.id, wake.wake_id)
        return None

    async def _finish(
        self, subscription: Subscription, *, ack_named_offset: int
    ) -> Subscription | None:
        """End the wake attempted, if it is still the outstanding one (a callback may have
        ended it first, or the subscription may be gone), and return the next wake."""
        assert subscription.wake is not None
        async with self._pool.acquire() as conn, conn.transaction():
            current = await store.get_subscription(conn, subscription.id, for_update=True)
            if current is None or current.wake is None:
                return None
            if current.wake.wake_id != subscription.wake.wake_id:
                return None
            return await wakes.finish_wake(
                conn, current, self.lease, ack_named_offset=ack_named_offset
            )

    async def _failed(self, subscription: Subscription, error: str) -> None:
        assert subscription.wake is not None
        delay = retry_delay_s(subscription.attempts + 1)
        log.warning(
            "wake %s of subscription %s not delivered (%s); retrying in %.1f s",
            subscription.wake.wake_id,
            subscription.id,
            error,
            delay,
        )
        async with self._pool.acquire() as conn:
            await wake_store.record_attempt_failed(
                conn, subscription.id, subscription.wake.wake_id, delay, error
            )
        self.kick()
        return None


def _is_done(answer: bytes) -> bool:
    try:
        parsed = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and parsed.get("done") is True

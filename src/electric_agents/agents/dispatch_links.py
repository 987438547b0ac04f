"""Dispatch linking (spec/02 §3.4 "Common side effect C", §4.2 (b); spec/03 §5.11).

An entity with a dispatch policy has its main stream linked to the subscription of its
target, created if missing: a webhook subscription for a webhook target, a pull-wake one
writing wake events to the runner's wake stream for a runner target (spec/02 §4.9). Unlike
the reference, which called the DS control API after its own writes, the link is written on
the caller's connection inside the spawn or send transaction, before the inbox append: a
send cannot commit without the link that wakes its handler, and a crash cannot leave one
without the other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from electric_agents.agents import runner_store
from electric_agents.agents.dispatch_policy import REWRITE_LOOPBACK_ENV, rewrite_loopback_url
from electric_agents.agents.entity_store import Entity
from electric_agents.agents.events import stream_path
from electric_agents.config import env_value
from electric_agents.errors import ApiError
from electric_agents.streams import store as stream_store
from electric_agents.streams import subscription_store as store
from electric_agents.streams.subscriptions import (
    DEFAULT_LEASE_TTL_MS,
    SubscriptionConfig,
    check_webhook_url,
)

log = logging.getLogger(__name__)


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dispatch_target(policy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy's (only) target."""
    targets = (policy or {}).get("targets") or []
    target = targets[0] if targets else None
    return target if isinstance(target, dict) else None


def webhook_target(policy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy's target when it is a webhook one."""
    target = dispatch_target(policy)
    return target if target is not None and target.get("type") == "webhook" else None


def runner_target(policy: dict[str, Any] | None) -> dict[str, Any] | None:
    """The policy's target when it is a runner one."""
    target = dispatch_target(policy)
    if target is not None and target.get("type") == "runner" and target.get("runnerId"):
        return target
    return None


def dispatch_subscription_id(target: dict[str, Any], entity_url: str) -> str:
    """spec/02 §4.2 (b): the shared `webhook:<sha16(url)>`, or `<subscription_id>:<sha16
    (entityUrl)>` per entity when the target names its subscription; runner targets are
    always per entity."""
    explicit = target.get("subscription_id")
    if target.get("type") == "runner":
        base = explicit or f"runner:{target['runnerId']}"
        return f"{base}:{_sha16(entity_url)}"
    if explicit:
        return f"{explicit}:{_sha16(entity_url)}"
    return f"webhook:{_sha16(target['url'])}"


async def link_dispatch(
    conn: asyncpg.Connection,
    tenant: str,
    entity: Entity,
    *,
    on_subscription_created: Callable[[], None] | None = None,
) -> None:
    """Link the entity's main stream to its dispatch subscription, on `conn` (in the
    caller's transaction, after the main stream exists). The link starts at the stream's
    current tail, so only what is appended later wakes the handler."""
    runner = runner_target(entity.dispatch_policy)
    if runner is not None:
        await _link_runner(conn, tenant, entity, runner, on_subscription_created)
        return
    target = webhook_target(entity.dispatch_policy)
    if target is None:
        return
    url = target.get("url")
    if not isinstance(url, str) or not url:
        raise ApiError(400, "INVALID_REQUEST", "Webhook dispatch target must include a valid URL")
    rewrite_to = env_value(REWRITE_LOOPBACK_ENV)
    try:
        handler_url = rewrite_loopback_url(url, rewrite_to)
    except ValueError:
        raise ApiError(
            400, "INVALID_REQUEST", "Webhook dispatch target must include a valid URL"
        ) from None
    if not rewrite_to:
        # The rule of `/__ds/subscriptions` (no plain http to other hosts, against SSRF).
        # The policy itself is valid, so the entity is kept, just never dispatched to.
        try:
            check_webhook_url(handler_url)
        except ApiError as error:
            log.warning("not dispatching %s to %s: %s", entity.url, handler_url, error.message)
            return
    subscription_id = dispatch_subscription_id(target, entity.url)
    path = stream_path(entity.main_stream)
    subscription = await store.get_subscription(conn, subscription_id)
    if subscription is None:
        config = SubscriptionConfig(
            type="webhook",
            pattern=None,
            streams=(path,),
            webhook_url=handler_url,
            wake_stream=None,
            lease_ttl_ms=DEFAULT_LEASE_TTL_MS,
            description=f"Electric Agents webhook {subscription_id}",
        )
        # A racing creator commits first and this insert does nothing: the link below
        # attaches to its row either way.
        if await store.insert_subscription(conn, subscription_id, config) is not None:
            log.info("created dispatch subscription %s -> %s", subscription_id, handler_url)
            if on_subscription_created is not None:
                on_subscription_created()
        await conn.execute(
            """
            INSERT INTO subscription_webhooks (tenant_id, subscription_id, webhook_url)
            VALUES ($1, $2, $3)
            ON CONFLICT (tenant_id, subscription_id) DO UPDATE SET webhook_url = $3
            """,
            tenant,
            subscription_id,
            handler_url,
        )
    await _link_stream(conn, subscription_id, path)


async def _link_runner(
    conn: asyncpg.Connection,
    tenant: str,
    entity: Entity,
    target: dict[str, Any],
    on_subscription_created: Callable[[], None] | None,
) -> None:
    """spec/02 §4.2 (b) runner target: a per-entity pull-wake subscription whose wake
    events go to the runner's wake stream."""
    runner_id: str = target["runnerId"]
    runner = await runner_store.get_runner(conn, tenant, runner_id)
    if runner is None:
        raise ApiError(404, "NOT_FOUND", f'Runner "{runner_id}" not found')
    wake_stream = stream_path(runner.wake_stream)
    if await stream_store.get_meta(conn, wake_stream) is None:
        # Registration creates it in the runner's own transaction, so only an explicit
        # DELETE of the stream gets here; wake events are retried until the runner
        # registers again (which recreates it).
        log.warning("wake stream %s of runner %s is missing", wake_stream, runner_id)
    subscription_id = dispatch_subscription_id(target, entity.url)
    path = stream_path(entity.main_stream)
    if await store.get_subscription(conn, subscription_id) is None:
        config = SubscriptionConfig(
            type="pull-wake",
            pattern=None,
            streams=(path,),
            webhook_url=None,
            wake_stream=wake_stream,
            lease_ttl_ms=DEFAULT_LEASE_TTL_MS,
            description=f"Electric Agents runner {runner_id}",
        )
        if await store.insert_subscription(conn, subscription_id, config) is not None:
            log.info("created dispatch subscription %s -> runner %s", subscription_id, runner_id)
            if on_subscription_created is not None:
                on_subscription_created()
    await _link_stream(conn, subscription_id, path)


async def _link_stream(conn: asyncpg.Connection, subscription_id: str, path: str) -> None:
    already = await conn.fetchval(
        """
        SELECT explicit FROM ds_subscription_links WHERE subscription_id = $1 AND path = $2
        """,
        subscription_id,
        path,
    )
    if not already:
        await store.link_explicit(conn, subscription_id, [path])


async def unlink_dispatch(conn: asyncpg.Connection, entity: Entity) -> None:
    """Drop the main stream's link to its dispatch subscription (terminal entry), in the
    caller's transaction. A wake outstanding for that very stream keeps its link until it
    ends (its done acknowledges the stream, which needs the link); the closed stream then
    produces no further wakes."""
    target = runner_target(entity.dispatch_policy) or webhook_target(entity.dispatch_policy)
    if target is None or (target["type"] == "webhook" and not target.get("url")):
        return
    subscription_id = dispatch_subscription_id(target, entity.url)
    path = stream_path(entity.main_stream)
    subscription = await store.get_subscription(conn, subscription_id)
    if subscription is None:
        return
    if subscription.wake is not None and subscription.wake.path == path:
        return
    await store.unlink_explicit(conn, subscription_id, path)

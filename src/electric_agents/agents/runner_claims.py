"""Runner claims, the pull-wake side of wake dispatch (spec/02 §3.5 claim, §4.9; spec/03
§5.14): a runner that read a wake event from its wake stream claims the wake through the
in-process subscription service and gets the same notification a webhook handler gets.

The claim's durable records (`consumer_callbacks`, the active `consumer_claims` row, the
entity's `entity_dispatch_state.active_*` fields) and the `running` status commit in one
transaction, under the entity's row lock.

Deliberate fixes of the reference: for a paused or terminal entity the reference released
the claim, and since its stream was still pending the subscription woke the runner again at
once, in a loop for as long as the entity stayed paused. Here the wake is ended the way a
webhook handler's `{"done":true}` ends it (its stream acknowledged up to the wake's tail),
exactly what the webhook path does for such an entity; a wake of a stream no entity owns is
ended the same way. A runner may also claim from any pull-wake subscription that writes to
its own wake stream (see `_claimable_subscription`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import asyncpg

from electric_agents.agents import runner_store
from electric_agents.agents.consumer_callback_store import (
    pull_wake_callback,
    upsert_consumer_callback,
)
from electric_agents.agents.consumer_claim_store import ActiveClaim, materialize_active_claim
from electric_agents.agents.entity_store import Entity, get_entity, set_status
from electric_agents.agents.principals import Principal
from electric_agents.agents.runner_store import Runner
from electric_agents.agents.runners import runner_not_found
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.signals import WAKE_START_TABLE
from electric_agents.agents.stream_policy import entity_url_of_stream
from electric_agents.agents.wake_dispatch import entity_document, principal_document
from electric_agents.errors import ApiError, bad_request
from electric_agents.streams import subscription_store
from electric_agents.streams.subscription_service import SubscriptionService, WakeReport
from electric_agents.streams.subscriptions import normalize_path
from electric_agents.streams.wakes import Ack

log = logging.getLogger(__name__)

# What the subscription service's claim errors become (spec/02 §3.5).
_PASSED_THROUGH_CONFLICTS = ("NO_PENDING_WORK", "ALREADY_CLAIMED")


@dataclass(frozen=True)
class ClaimRequest:
    """The claim body: typically the wake event the runner read (extra keys ignored)."""

    subscription_id: str | None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> ClaimRequest:
        return cls(subscription_id=document.get("subscription_id"))


def check_subscription_id(runner_id: str, subscription_id: str | None) -> str:
    """`runner:<id>` or `runner:<id>:...` (absent -> `runner:<id>`), else 400."""
    base = f"runner:{runner_id}"
    chosen = base if subscription_id is None else subscription_id
    if chosen != base and not chosen.startswith(base + ":"):
        raise bad_request("Wake event subscription_id does not match runner")
    return chosen


async def _claim_at_subscription(
    subscriptions: SubscriptionService, subscription_id: str, runner_id: str
) -> dict[str, Any] | None:
    """The subscription service's claim; None when there is nothing to claim."""
    try:
        return await subscriptions.claim(subscription_id, runner_id)
    except ApiError as error:
        if error.status == 404:
            return None
        if error.status == 409 and error.code in _PASSED_THROUGH_CONFLICTS:
            # Only code and message, as the reference (no current_holder/generation).
            raise ApiError(409, error.code, error.message) from None
        if error.status == 400:
            # Not a pull-wake subscription. The reference let this surface as a 500; it is
            # the caller naming the wrong subscription.
            raise bad_request(error.message) from None
        raise


def _primary_stream(streams: list[dict[str, Any]]) -> dict[str, Any] | None:
    for stream in streams:
        if stream.get("has_pending") is True:
            return stream
    return streams[0] if streams else None


async def claim_runner_wake(
    runtime: AgentsRuntime,
    subscriptions: SubscriptionService,
    caller: Principal,
    runner_id: str,
    request: ClaimRequest,
) -> dict[str, Any] | None:
    """POST /_electric/runners/:id/claim, checks in the order of spec/02 §3.5. Returns the
    notification, `{"done":true}` for an entity that must not run, or None (204) when
    there is no wake to claim."""
    tenant = runtime.tenant_id
    runner = None
    if "\x00" not in runner_id:
        async with runtime.pool.acquire() as conn:
            runner = await runner_store.get_runner(conn, tenant, runner_id)
    if runner is None:
        raise runner_not_found()
    if runner.owner_principal != caller.url:
        raise ApiError(403, "UNAUTHORIZED", "Runner claim requires the authenticated owner")
    if runner.admin_status != "enabled":
        raise ApiError(409, "NOT_RUNNING", "Runner is disabled")
    subscription_id = await _claimable_subscription(runtime, runner, request.subscription_id)
    if "\x00" in subscription_id:
        return None  # no subscription can have it in its id (PostgreSQL text cannot hold it)
    claimed = await _claim_at_subscription(subscriptions, subscription_id, runner_id)
    if claimed is None:
        return None
    wake_id: str = claimed["wake_id"]
    generation: int = claimed["generation"]
    token: str = claimed["token"]
    primary = _primary_stream(claimed.get("streams") or [])
    if primary is None:
        raise ApiError(502, "INVALID_REQUEST", "Claim response did not include a stream")
    primary_stream = "/" + str(primary["path"]).lstrip("/")
    entity_url = entity_url_of_stream(primary_stream)
    entity = None
    target = None
    if entity_url is not None:
        async with runtime.engine.transaction() as tx:
            entity, target = await _start_run(
                tx.conn, tenant, entity_url, runner_id, subscription_id, claimed, primary_stream
            )
    if entity is None:
        # No entity can ever run this wake: end it rather than let its lease run out and
        # the same wake come back every lease period (the reference left it claimed).
        await _end_unrun_wake(subscriptions, subscription_id, claimed, primary)
        raise ApiError(404, "NOT_FOUND", "Claim stream is not attached to an entity")
    if target is None:
        # Paused or terminal (spec/03 T7): nothing runs; see the module docstring.
        await _end_unrun_wake(subscriptions, subscription_id, claimed, primary)
        log.info("runner %s claim %s of %s answered done", runner_id, wake_id, entity.url)
        return {"done": True}
    log.info("runner %s claimed %s for %s (epoch %d)", runner_id, wake_id, entity.url, generation)
    notification: dict[str, Any] = {
        "consumerId": wake_id,
        "epoch": generation,
        "wakeId": wake_id,
        "streamPath": primary_stream,
        "streams": [
            {"path": "/" + str(stream["path"]).lstrip("/"), "offset": stream["tail_offset"] or ""}
            for stream in claimed["streams"]
        ],
        "callback": f"{runtime.public_url}/_electric/callback-forward/{quote(wake_id, safe='')}",
        "claimToken": token,
        "triggerEvent": "message_received",
        "entity": entity_document(entity, entity.status),
    }
    principal = principal_document(entity.created_by)
    if principal is not None:
        notification["principal"] = principal
    return notification


async def _start_run(
    conn: asyncpg.Connection,
    tenant: str,
    entity_url: str,
    runner_id: str,
    subscription_id: str,
    claimed: dict[str, Any],
    primary_stream: str,
) -> tuple[Entity | None, str | None]:
    """Under the entity's row lock: the entity as it was before (None if there is none)
    and the status it runs in (None when it must not run); when it runs, its status and
    the claim's durable records are written (spec/03 T8)."""
    entity = await get_entity(conn, tenant, entity_url, for_update=True)
    if entity is None:
        return None, None
    target = WAKE_START_TABLE[entity.status]
    if target is None:
        return entity, None
    if target != entity.status:
        await set_status(conn, tenant, entity_url, target)
    wake_id: str = claimed["wake_id"]
    await upsert_consumer_callback(
        conn, tenant, wake_id, pull_wake_callback(subscription_id), primary_stream
    )
    await materialize_active_claim(
        conn,
        tenant,
        ActiveClaim(
            consumer_id=wake_id,
            epoch=claimed["generation"],
            entity_url=entity_url,
            stream_path=primary_stream,
            runner_id=runner_id,
            lease_ttl_ms=claimed.get("lease_ttl_ms"),
        ),
    )
    return entity, target


async def _claimable_subscription(
    runtime: AgentsRuntime, runner: Runner, requested: str | None
) -> str:
    """The subscription to claim from: named after the runner (spec/02 §3.5), or, a fix of
    the reference, any pull-wake subscription writing to this runner's wake stream: a runner
    target with its own `subscription_id` (spec/02 §4.2 (b)) gets `<subscription_id>:<hash>`,
    which the name rule alone made unclaimable."""
    try:
        return check_subscription_id(runner.id, requested)
    except ApiError:
        if requested and "\x00" not in requested:
            async with runtime.pool.acquire() as conn:
                subscription = await subscription_store.get_subscription(conn, requested)
            if (
                subscription is not None
                and subscription.type == "pull-wake"
                and subscription.wake_stream == normalize_path(runner.wake_stream)
            ):
                return requested
        raise


async def _end_unrun_wake(
    subscriptions: SubscriptionService,
    subscription_id: str,
    claimed: dict[str, Any],
    primary: dict[str, Any],
) -> None:
    report = WakeReport(
        wake_id=claimed["wake_id"],
        generation=claimed["generation"],
        acks=[Ack(stream=str(primary["path"]), offset=str(primary["tail_offset"]))],
        done=True,
    )
    try:
        await subscriptions.ack(subscription_id, claimed["token"], report)
    except ApiError as error:
        # The lease ends the wake anyway; the runner's answer does not depend on this.
        log.warning("ending wake %s of %s: %s", claimed["wake_id"], subscription_id, error.message)

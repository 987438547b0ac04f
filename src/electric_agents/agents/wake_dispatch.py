"""Wake dispatch over webhooks (spec/02 §4.5-4.8, spec/03 §4.10, §5.13), in process.

There is no separate Durable Streams server: the subscription service hands every webhook
wake to `EntityWebhookForwarder` before it is signed with our key and posted, so the handler
gets the enriched body of §4.5 directly, and its answer (`{"done":true}` or not) is the one
the delivery worker acts on. `callback-forward` turns the handler's claim, heartbeat and done
into subscription-service calls: `callback` for webhook consumers, `ack` for the
pull-wake consumers of runner claims (`ds-subscription:<id>`, agents/runner_claims.py),
whose durable claim rows follow each heartbeat and done.

Deliberate fix of the reference: a claim mints a write token only for a caller presenting
that wake's claim token (the reference answered claims without checking any token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import asyncpg

from electric_agents.agents import signals
from electric_agents.agents.consumer_callback_store import (
    get_consumer_callback,
    upsert_consumer_callback,
)
from electric_agents.agents.consumer_claim_store import record_claim_heartbeat, release_claim
from electric_agents.agents.entity_store import Entity, get_entity
from electric_agents.agents.principals import parse_principal
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.stream_policy import entity_url_of_stream
from electric_agents.agents.write_tokens import mint_write_token
from electric_agents.errors import ApiError
from electric_agents.streams import subscription_store
from electric_agents.streams.subscription_service import SubscriptionService, WakeReport
from electric_agents.streams.subscriptions import Subscription
from electric_agents.streams.wakes import Ack

log = logging.getLogger(__name__)

_CALLBACK_SUFFIX = "/callback"
_SUBSCRIPTIONS_SEGMENT = "/__ds/subscriptions/"


def principal_document(created_by: str | None) -> dict[str, Any] | None:
    if not created_by:
        return None
    principal = parse_principal(created_by)
    if principal is None or not created_by.startswith("/principal/"):
        return {"url": created_by, "key": None}
    return {
        "url": principal.url,
        "key": principal.key,
        "kind": principal.kind,
        "id": principal.id,
    }


def entity_document(entity: Entity, status_before: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": entity.type,
        "status": status_before,
        "url": entity.url,
        "streams": {"main": entity.main_stream, "error": entity.error_stream},
        "tags": entity.tags,
        "spawnArgs": entity.spawn_args or {},
    }
    if entity.created_by:
        out["createdBy"] = entity.created_by
    return out


def subscription_of_callback_url(callback_url: str) -> str | None:
    """The subscription id inside a stored `<root>/__ds/subscriptions/<id>/callback` URL."""
    _, found, tail = callback_url.rpartition(_SUBSCRIPTIONS_SEGMENT)
    if not found or not tail.endswith(_CALLBACK_SUFFIX):
        return None
    return unquote(tail[: -len(_CALLBACK_SUFFIX)])


class EntityWebhookForwarder:
    """The enrichment of spec/02 §4.5 for wakes whose stream is an entity's main stream."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self._runtime = runtime

    def callback_forward_url(self, consumer_id: str) -> str:
        encoded = quote(consumer_id, safe="")
        return f"{self._runtime.public_url}/_electric/callback-forward/{encoded}"

    async def forward_body(
        self, subscription: Subscription, payload: dict[str, Any]
    ) -> dict[str, Any] | None:
        runtime = self._runtime
        stream = payload["streams"][0]
        primary_stream = "/" + str(stream["path"]).lstrip("/")
        wake_id: str = payload["wake_id"]
        async with runtime.pool.acquire() as conn:
            await upsert_consumer_callback(
                conn, runtime.tenant_id, wake_id, payload["callback_url"], primary_stream
            )
        entity_url = entity_url_of_stream(primary_stream)
        entity = None
        if entity_url is not None:
            async with runtime.pool.acquire() as conn:
                entity = await get_entity(conn, runtime.tenant_id, entity_url)
        body = dict(payload)
        if entity is not None:
            change = await signals.on_wake_started(runtime, entity.url)
            if change is None:
                # Paused or terminal (spec/02 §4.5; unlike the reference a killed entity is
                # not woken either): the wake is answered done, the handler is not called.
                log.info("wake %s of %s answered done without the handler", wake_id, entity.url)
                return None
            body["entity"] = entity_document(entity, change.previous_state or entity.status)
            principal = principal_document(entity.created_by)
            if principal is not None:
                body["principal"] = principal
            body["triggerEvent"] = "inbox"
        body["callback"] = self.callback_forward_url(wake_id)
        body["consumerId"] = wake_id
        body["epoch"] = payload["generation"]
        body["wakeId"] = wake_id
        body["streamPath"] = primary_stream
        body["streams"] = [{"path": primary_stream, "offset": stream["tail_offset"]}]
        body["claimToken"] = payload["callback_token"]
        return body

    async def forward_failed(self, subscription: Subscription, payload: dict[str, Any]) -> None:
        entity = payload.get("entity")
        if isinstance(entity, dict) and entity.get("status") not in ("running", "stopping"):
            # Set running by this delivery: nothing runs now (spec/02 §4.10).
            await signals.on_run_finished(self._runtime, entity["url"])


@dataclass(frozen=True)
class CallbackRequest:
    """A handler's `callback-forward` body (spec/02 §4.7), parsed."""

    epoch: int | None
    wake_id: str | None
    acks: list[Ack]
    done: bool | None


async def forward_callback(
    runtime: AgentsRuntime,
    subscriptions: SubscriptionService,
    consumer_id: str,
    claim_token: str | None,
    request: CallbackRequest,
) -> dict[str, Any]:
    """Claim (answered here), heartbeat or done (the subscription's callback)."""
    tenant = runtime.tenant_id
    async with runtime.pool.acquire() as conn:
        consumer = await get_consumer_callback(conn, tenant, consumer_id)
    subscription_id = None
    pull_wake = False
    if consumer is not None:
        subscription_id = consumer.pull_wake_subscription
        pull_wake = subscription_id is not None
        if not pull_wake:
            subscription_id = subscription_of_callback_url(consumer.callback_url)
    if consumer is None or subscription_id is None:
        raise ApiError(404, "CALLBACK_NOT_FOUND", "Unknown callback-forward consumer")
    if not claim_token:
        raise ApiError(401, "UNAUTHORIZED", "Missing claim token")
    entity_url = entity_url_of_stream(consumer.primary_stream or "")
    if request.wake_id is not None and request.done is not True:
        # The claim: the token must be this wake's (closes the reference's hole).
        claims = subscriptions.tokens.verify(claim_token, subscription_id)
        if claims.wake_id != consumer_id:
            raise ApiError(401, "UNAUTHORIZED", "Claim token is not for this wake")
        answer: dict[str, Any] = {"ok": True}
        if entity_url is not None:
            async with runtime.pool.acquire() as conn:
                if await get_entity(conn, tenant, entity_url) is not None:
                    answer["writeToken"] = await mint_write_token(
                        conn, tenant, entity_url, consumer_id
                    )
        return answer
    report = WakeReport(
        wake_id=request.wake_id or consumer_id,
        generation=request.epoch,
        acks=request.acks,
        done=request.done is True,
    )
    if pull_wake:
        return await _report_pull_wake(
            runtime, subscriptions, consumer_id, subscription_id, claim_token, entity_url, report
        )

    async def end_run() -> None:
        if entity_url is not None:
            await signals.on_run_finished(runtime, entity_url, wake_id=consumer_id)

    next_wake = await subscriptions.callback(
        subscription_id, claim_token, report, after_done=end_run
    )
    return {"ok": True, "next_wake": next_wake}


async def _report_pull_wake(
    runtime: AgentsRuntime,
    subscriptions: SubscriptionService,
    consumer_id: str,
    subscription_id: str,
    claim_token: str,
    entity_url: str | None,
    report: WakeReport,
) -> dict[str, Any]:
    """A runner's heartbeat or done (spec/02 §4.7 pull-wake consumers): an ack on the
    subscription with the claim token, then the durable claim row follows it."""
    tenant = runtime.tenant_id
    epoch = report.generation
    acked = [{"path": "/" + ack.stream.lstrip("/"), "offset": ack.offset} for ack in report.acks]

    async def release(conn: asyncpg.Connection) -> bool:
        if epoch is None:
            return False
        return await release_claim(conn, tenant, consumer_id, epoch, acked)

    async def end_run() -> None:
        if entity_url is not None:
            await signals.on_run_finished(
                runtime, entity_url, wake_id=consumer_id, release_claim=release
            )

    try:
        next_wake = await subscriptions.ack(
            subscription_id, claim_token, report, after_done=end_run
        )
    except ApiError as error:
        # spec/02 §4.7: any error of the subscription's ack is a failed forward.
        raise ApiError(
            502, "CALLBACK_FORWARD_FAILED", f"{error.status} {error.code}: {error.message}"
        ) from None
    if not report.done and epoch is not None:
        async with runtime.pool.acquire() as conn:
            subscription = await subscription_store.get_subscription(conn, subscription_id)
            await record_claim_heartbeat(
                conn,
                tenant,
                consumer_id,
                epoch,
                subscription.lease_ttl_ms if subscription is not None else None,
            )
    return {"ok": True, "next_wake": next_wake}

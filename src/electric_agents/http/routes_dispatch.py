"""The handler's side of a wake (spec/02 §3.2, §3.5, §4.7, §4.9):

* `POST /_electric/callback-forward/:consumerId` -> claim `{"ok","writeToken"}`, heartbeat or
  done `{"ok","next_wake"}`
* `POST /_electric/runners/:id/claim` -> the wake notification, `{"done":true}`, or 204
"""

from __future__ import annotations

from typing import Any

from electric_agents.agents import runner_claims
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.wake_dispatch import CallbackRequest, forward_callback
from electric_agents.agents.write_tokens import claim_token_from_headers
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response
from electric_agents.streams.subscription_service import SubscriptionService
from electric_agents.streams.wakes import Ack

_ACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "stream": {"type": "string"},
        "offset": {"type": "string"},
    },
}

CALLBACK_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "epoch": {"type": "number"},
        "generation": {"type": "number"},
        "wakeId": {"type": "string"},
        "wake_id": {"type": "string"},
        "acks": {"type": "array", "items": _ACK_SCHEMA},
        "done": {"type": "boolean"},
    },
}


# Extra keys allowed: the body is typically the wake event itself (spec/02 §3.5, §4.9).
CLAIM_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "subscription_id": {"type": "string"},
        "stream": {"type": "string"},
        "generation": {"type": "number"},
        "ts": {"type": ["string", "number"]},
    },
}


def parse_callback_request(body: bytes) -> CallbackRequest:
    document = validated_body(body, CALLBACK_BODY_SCHEMA)
    epoch = document.get("generation", document.get("epoch"))
    acks = [
        Ack(
            stream=str(ack.get("stream", ack.get("path", ""))).lstrip("/"),
            offset=ack.get("offset", ""),
        )
        for ack in document.get("acks", [])
    ]
    return CallbackRequest(
        epoch=int(epoch) if epoch is not None else None,
        wake_id=document.get("wake_id", document.get("wakeId")),
        acks=acks,
        done=document.get("done"),
    )


def routes(runtime: AgentsRuntime, subscriptions: SubscriptionService) -> list[Route]:
    async def callback_forward(request: Request) -> Response:
        answer = await forward_callback(
            runtime,
            subscriptions,
            request.param("consumerId"),
            claim_token_from_headers(request.headers),
            parse_callback_request(request.body),
        )
        return json_response(200, answer)

    async def claim_runner_wake(request: Request) -> Response:
        # The body is checked before the runner is looked up (spec/02 §3.5).
        body = validated_body(request.body, CLAIM_BODY_SCHEMA)
        notification = await runner_claims.claim_runner_wake(
            runtime,
            subscriptions,
            request.principal,
            request.param("id"),
            runner_claims.ClaimRequest.from_document(body),
        )
        if notification is None:
            return Response(204)
        return json_response(200, notification)

    return [
        Route("POST", "/_electric/callback-forward/:consumerId", callback_forward),
        Route("POST", "/_electric/runners/:id/claim", claim_runner_wake),
    ]

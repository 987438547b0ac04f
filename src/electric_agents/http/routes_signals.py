"""Routes for signals and legacy kill (spec/02 §3.4, spec/03 §2.4):

* `POST /_electric/entities/:type/:instanceId/signal` -> SignalResponse
* `DELETE /_electric/entities/:type/:instanceId` -> `{"txid"}` (SIGKILL, "Legacy kill command")

Both run the existing-entity checks of spec/02 §3.4 "Common middleware A" before the body is
read, and refuse principal entities (guard B).
"""

from __future__ import annotations

from typing import Any

from electric_agents.agents.entities import require_entity
from electric_agents.agents.entity_store import Entity
from electric_agents.agents.entity_types import PRINCIPAL_TYPE_NAME
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.signals import ENTITY_SIGNALS, NO_PAYLOAD, send_signal
from electric_agents.errors import ApiError
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

SIGNAL_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "signal": {"enum": list(ENTITY_SIGNALS)},
        "reason": {"type": "string"},
    },
    "required": ["signal"],
}

LEGACY_KILL_REASON = "Legacy kill command"


def routes(runtime: AgentsRuntime) -> list[Route]:
    async def existing(request: Request) -> Entity:
        # Middleware A: 404 (or a principal's entity created on first mention) before the
        # body is read.
        return await require_entity(runtime, request.params["type"], request.params["instanceId"])

    async def signal(request: Request) -> Response:
        entity = await existing(request)
        body = validated_body(request.body, SIGNAL_BODY_SCHEMA)
        refuse_principal(entity, "signaled")
        result = await send_signal(
            runtime,
            entity.url,
            body["signal"],
            reason=body.get("reason"),
            payload=body.get("payload", NO_PAYLOAD),
        )
        # A terminal entity's main stream was unlinked from its dispatch subscription in
        # the signal's transaction (enter_terminal), and its write token revoked.
        return json_response(200, result.wire())

    async def legacy_kill(request: Request) -> Response:
        entity = await existing(request)
        refuse_principal(entity, "killed")
        result = await send_signal(runtime, entity.url, "SIGKILL", reason=LEGACY_KILL_REASON)
        return json_response(200, {"txid": result.txid})

    return [
        Route("POST", "/_electric/entities/:type/:instanceId/signal", signal),
        Route("DELETE", "/_electric/entities/:type/:instanceId", legacy_kill),
    ]


def refuse_principal(entity: Entity, action: str) -> None:
    """spec/02 §3.4 guard B: principal entities are built in."""
    if entity.type == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            f"Principal entities are built in and cannot be {action}",
        )

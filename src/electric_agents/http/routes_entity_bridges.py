"""`POST /_electric/entities/register` (spec/02 §3.4): the `entities({tags})` observation
source. The membership drainer and the bridge collector run as workers of the runtime."""

from __future__ import annotations

from typing import Any

from electric_agents.agents import entity_bridges
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

REGISTER_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"tags": {"type": "object", "additionalProperties": {"type": "string"}}},
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    drainer = entity_bridges.MembershipDrainer(runtime)
    runtime.add_worker("entity-membership-drainer", drainer.run)
    runtime.add_worker("entity-bridge-collector", drainer.collect_forever)
    runtime.read_observers.append(drainer.observed)

    async def register(request: Request) -> Response:
        document = validated_body(request.body, REGISTER_BODY_SCHEMA)
        answer = await entity_bridges.register(runtime, document.get("tags") or {})
        return json_response(200, answer)

    return [Route("POST", "/_electric/entities/register", register)]

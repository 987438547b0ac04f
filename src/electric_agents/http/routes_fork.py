"""`POST /_electric/entities/:type/:instanceId/fork` (spec/02 §3.4): copy-on-write fork of
a top-level entity and its subtree."""

from __future__ import annotations

from typing import Any

import asyncpg

from electric_agents.agents import entities, fork
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

FORK_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"instance_id": {"type": "string"}, "waitTimeoutMs": {"type": "number"}},
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    async def fork_entity(request: Request) -> Response:
        source = await entities.require_entity(
            runtime, request.params["type"], request.params["instanceId"]
        )
        parsed = fork.parse_fork_request(validated_body(request.body, FORK_BODY_SCHEMA))

        async def check_owner(conn: asyncpg.Connection, policy: dict[str, Any] | None) -> None:
            await entities.check_runner_targets(conn, runtime.tenant_id, policy, request.principal)

        result = await fork.fork_subtree(runtime, source, parsed, check_owner)
        return json_response(
            201,
            {
                "root": result.root.public(),
                "entities": [entity.public() for entity in result.entities],
            },
        )

    return [Route("POST", "/_electric/entities/:type/:instanceId/fork", fork_entity)]

"""Routes for `/_electric/runners` (spec/02 §3.5). Bodies are validated before the runner is
looked up, so a malformed body is a 400 even for an unknown runner."""

from __future__ import annotations

from typing import Any

from electric_agents.agents import runners
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Handler, Request, Response, Route, json_response

_STRING = {"type": "string"}
# A non-empty id and wake stream: either empty would name no addressable runner or stream.
_NON_EMPTY_STRING = {"type": "string", "minLength": 1}

REGISTER_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": _NON_EMPTY_STRING,
        "label": _STRING,
        "owner_principal": _STRING,
        "kind": {"type": "string", "enum": list(runners.RUNNER_KINDS)},
        "admin_status": {"type": "string", "enum": list(runners.ADMIN_STATUSES)},
        "wake_stream": _NON_EMPTY_STRING,
    },
    "required": ["id", "label"],
}

HEARTBEAT_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "lease_ms": {"type": "number"},
        "wake_stream_offset": _STRING,
        "wakeStreamOffset": _STRING,
        "liveness_lease_expires_at": _STRING,
        "diagnostics": {"type": "object"},
    },
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    async def register_runner(request: Request) -> Response:
        body = validated_body(request.body, REGISTER_BODY_SCHEMA)
        registration = runners.RunnerRegistration.from_document(body)
        runner = await runners.register_runner(runtime, request.principal, registration)
        return json_response(201, runners.public_runner(runner))

    async def list_runners(request: Request) -> Response:
        found = await runners.list_runners(
            runtime, request.principal, request.query_value("owner_principal")
        )
        return json_response(200, [runners.public_runner(runner) for runner in found])

    async def get_runner(request: Request) -> Response:
        runner = await runners.get_runner(runtime, request.principal, request.param("id"))
        return json_response(200, runners.public_runner(runner))

    async def runner_health(request: Request) -> Response:
        report = await runners.runner_health(runtime, request.principal, request.param("id"))
        return json_response(200, report)

    async def heartbeat(request: Request) -> Response:
        body = validated_body(request.body, HEARTBEAT_BODY_SCHEMA)
        recorded = await runners.record_heartbeat(
            runtime, request.principal, request.param("id"), runners.Heartbeat.from_document(body)
        )
        return json_response(200, recorded)

    def admin_status_setter(admin_status: str) -> Handler:
        async def set_admin_status(request: Request) -> Response:
            runner = await runners.set_admin_status(
                runtime, request.principal, request.param("id"), admin_status
            )
            return json_response(200, runners.public_runner(runner))

        return set_admin_status

    return [
        Route("POST", "/_electric/runners", register_runner),
        Route("GET", "/_electric/runners", list_runners),
        Route("GET", "/_electric/runners/:id/health", runner_health),
        Route("POST", "/_electric/runners/:id/heartbeat", heartbeat),
        Route("POST", "/_electric/runners/:id/enable", admin_status_setter("enabled")),
        Route("POST", "/_electric/runners/:id/disable", admin_status_setter("disabled")),
        Route("GET", "/_electric/runners/:id", get_runner),
    ]

"""Routes for `/_electric/entity-types` (spec/02 §3.3). `:name` is used raw (spec/02 §2.5)."""

from __future__ import annotations

from typing import Any

from electric_agents.agents import entity_types
from electric_agents.agents.dispatch_policy import DISPATCH_POLICY_SCHEMA
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

_OBJECT = {"type": "object"}
_SCHEMA_MAP = {"type": "object", "additionalProperties": _OBJECT}

# Open schemas: the runtime also sends `public_url` and `runtime_name`, the conformance DSL
# `metadata_schema`; unknown keys are ignored.
REGISTER_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "creation_schema": _OBJECT,
        "inbox_schemas": _SCHEMA_MAP,
        "state_schemas": _SCHEMA_MAP,
        "input_schemas": _SCHEMA_MAP,
        "output_schemas": _SCHEMA_MAP,
        "serve_endpoint": {"type": "string"},
        "default_dispatch_policy": DISPATCH_POLICY_SCHEMA,
    },
}

AMEND_SCHEMAS_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "inbox_schemas": _SCHEMA_MAP,
        "state_schemas": _SCHEMA_MAP,
        "input_schemas": _SCHEMA_MAP,
        "output_schemas": _SCHEMA_MAP,
    },
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    async def list_types(_request: Request) -> Response:
        found = await entity_types.list_entity_types(runtime)
        return json_response(200, [entity_type.public() for entity_type in found])

    async def register_type(request: Request) -> Response:
        body = validated_body(request.body, REGISTER_BODY_SCHEMA)
        registered = await entity_types.register_entity_type(runtime, body)
        return json_response(201, registered.public())

    async def get_type(request: Request) -> Response:
        found = await entity_types.require_entity_type(runtime, request.params["name"])
        return json_response(200, found.public())

    async def amend_schemas(request: Request) -> Response:
        body = validated_body(request.body, AMEND_SCHEMAS_BODY_SCHEMA)
        inbox = body.get("inbox_schemas")
        state = body.get("state_schemas")
        amended = await entity_types.amend_entity_type_schemas(
            runtime,
            request.params["name"],
            inbox_schemas=inbox if inbox is not None else body.get("input_schemas"),
            state_schemas=state if state is not None else body.get("output_schemas"),
        )
        return json_response(200, amended.public())

    async def delete_type(request: Request) -> Response:
        await entity_types.delete_entity_type(runtime, request.params["name"])
        return Response(204)

    return [
        Route("GET", "/_electric/entity-types", list_types),
        Route("POST", "/_electric/entity-types", register_type),
        Route("PATCH", "/_electric/entity-types/:name/schemas", amend_schemas),
        Route("GET", "/_electric/entity-types/:name", get_type),
        Route("DELETE", "/_electric/entity-types/:name", delete_type),
    ]

"""Routes for `/_electric/entities` except signals and legacy kill (spec/02 §3.4): list,
spawn, read, send, inbox edits and tags.

Every `/:type/:instanceId…` route resolves the entity first (middleware A: 404 before the
body is read), then validates the body against its API schema (400), then calls the domain.
"""

from __future__ import annotations

from typing import Any

from electric_agents.agents import entities, inbox, tags
from electric_agents.agents.dispatch_policy import DISPATCH_POLICY_SCHEMA
from electric_agents.agents.entity_store import Entity
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.write_tokens import claim_token_from_headers
from electric_agents.http.api_schemas import MILLISECONDS_SCHEMA, WAKE_CONDITION_SCHEMA
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

_INBOX_MODES = ["immediate", "queued", "paused", "steer"]
_INBOX_FIELDS = ("payload", "position", "mode", "status")


SPAWN_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "args": {"type": "object"},
        "tags": {"type": "object", "additionalProperties": {"type": "string"}},
        "parent": {"type": "string"},
        "dispatch_policy": DISPATCH_POLICY_SCHEMA,
        # Later reference versions type the initial message with this key; 0.4.9 clients
        # never send it, so accepting it changes nothing for them.
        "initialMessageType": {"type": "string"},
        "wake": {
            "type": "object",
            "properties": {
                "subscriberUrl": {"type": "string"},
                "condition": WAKE_CONDITION_SCHEMA,
                "debounceMs": MILLISECONDS_SCHEMA,
                "timeoutMs": MILLISECONDS_SCHEMA,
                "includeResponse": {"type": "boolean"},
                "manifestKey": {"type": "string"},
            },
            "required": ["subscriberUrl", "condition"],
        },
    },
}

SEND_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "key": {"type": "string"},
        "type": {"type": "string"},
        "mode": {"enum": _INBOX_MODES},
        "position": {"type": "string"},
        "afterMs": {"type": "number"},
        "from": {"type": "string"},
    },
}

INBOX_UPDATE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "position": {"type": "string"},
        "mode": {"enum": _INBOX_MODES},
        "status": {"enum": ["pending", "processed", "cancelled"]},
    },
}

TAG_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"value": {"type": "string"}},
    "required": ["value"],
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    drainer = tags.TagOutboxDrainer(runtime)
    runtime.add_worker("tag-outbox-drainer", drainer.run)

    async def existing(request: Request) -> Entity:
        return await entities.require_entity(
            runtime, request.params["type"], request.params["instanceId"]
        )

    async def list_entities(request: Request) -> Response:
        filters = entities.EntityFilters(
            type=request.query_value("type"),
            status=request.query_value("status"),
            parent=request.query_value("parent"),
            created_by=request.query_value("created_by"),
        )
        found = await entities.list_matching(runtime, filters)
        return json_response(200, [entity.public() for entity in found])

    async def spawn(request: Request) -> Response:
        type_segment, instance_segment = request.params["type"], request.params["instanceId"]
        await entities.check_spawnable(runtime, type_segment, instance_segment)
        body = validated_body(request.body, SPAWN_BODY_SCHEMA)
        result = await entities.spawn(
            runtime, request.principal, type_segment, instance_segment, _spawn_request(body)
        )
        payload = result.entity.public()
        if "tags" in body:
            payload["tags"] = body["tags"]  # as sent, like the reference's response
        if "args" not in body:
            del payload["spawn_args"]
        payload["txid"] = result.txid
        return json_response(201, payload, {"x-write-token": result.entity.write_token})

    async def get_entity(request: Request) -> Response:
        return json_response(200, (await existing(request)).public())

    async def head_entity(request: Request) -> Response:
        await existing(request)
        return Response(200)

    async def send(request: Request) -> Response:
        entity = await existing(request)
        body = validated_body(request.body, SEND_BODY_SCHEMA)
        message = inbox.SendRequest(
            payload=body.get("payload"),
            has_payload="payload" in body,
            key=body.get("key"),
            message_type=body.get("type"),
            mode=body.get("mode"),
            position=body.get("position"),
            after_ms=body.get("afterMs"),
            claimed_from=body.get("from"),
        )
        await inbox.send(runtime, request.principal, entity.url, message)
        return Response(204)

    async def update_inbox_message(request: Request) -> Response:
        entity = await existing(request)
        body = validated_body(request.body, INBOX_UPDATE_BODY_SCHEMA)
        # `payload` counts as given when the key is there, even with a null value.
        fields = {
            name: body[name] for name in ("payload", "position", "mode", "status") if name in body
        }
        await inbox.update_inbox_message(runtime, entity.url, request.param("messageKey"), fields)
        return Response(204)

    async def delete_inbox_message(request: Request) -> Response:
        entity = await existing(request)
        await inbox.delete_inbox_message(runtime, entity.url, request.param("messageKey"))
        return Response(204)

    async def set_tag(request: Request) -> Response:
        entity = await existing(request)
        body = validated_body(request.body, TAG_BODY_SCHEMA)
        updated = await tags.set_tag(
            runtime,
            entity.url,
            request.param("tagKey"),
            body["value"],
            claim_token_from_headers(request.headers),
        )
        drainer.nudge()
        return json_response(200, updated.public())

    async def delete_tag(request: Request) -> Response:
        entity = await existing(request)
        updated = await tags.remove_tag(
            runtime, entity.url, request.param("tagKey"), claim_token_from_headers(request.headers)
        )
        drainer.nudge()
        return json_response(200, updated.public())

    entity_path = "/_electric/entities/:type/:instanceId"
    return [
        Route("GET", "/_electric/entities", list_entities),
        Route("PUT", entity_path, spawn),
        Route("GET", entity_path, get_entity),
        Route("HEAD", entity_path, head_entity),
        Route("POST", f"{entity_path}/send", send),
        Route("PATCH", f"{entity_path}/inbox/:messageKey", update_inbox_message),
        Route("DELETE", f"{entity_path}/inbox/:messageKey", delete_inbox_message),
        Route("POST", f"{entity_path}/tags/:tagKey", set_tag),
        Route("DELETE", f"{entity_path}/tags/:tagKey", delete_tag),
    ]


def _spawn_request(body: dict[str, Any]) -> entities.SpawnRequest:
    initial = None
    if "initialMessage" in body:
        initial = entities.InitialMessage(body["initialMessage"], body.get("initialMessageType"))
    wake = None
    if "wake" in body:
        raw = body["wake"]
        wake = entities.WakeRegistration(
            subscriber_url=raw["subscriberUrl"],
            condition=raw["condition"],
            # Stored as whole milliseconds; 0 (or less) means none (spec/03 §4.1).
            debounce_ms=max(0, int(raw.get("debounceMs", 0))),
            timeout_ms=max(0, int(raw.get("timeoutMs", 0))),
            include_response=raw.get("includeResponse", True),
            manifest_key=raw.get("manifestKey"),
        )
    return entities.SpawnRequest(
        args=body.get("args"),
        tags=body.get("tags"),
        parent=body.get("parent"),
        dispatch_policy=body.get("dispatch_policy"),
        initial_message=initial,
        wake=wake,
    )

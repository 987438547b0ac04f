"""Routes for event sources (spec/02 §3.2 `GET /_electric/event-sources`, §3.4
`PUT|DELETE …/event-source-subscriptions/:subscriptionId`; spec/03 §5.9)."""

from __future__ import annotations

from typing import Any

from electric_agents.agents import entities, event_sources
from electric_agents.agents.event_source_catalog import SubscriptionRequest
from electric_agents.agents.principal_entities import reject_principal_mutation
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

SUBSCRIPTION_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sourceKey": {"type": "string"},
        "bucketKey": {"type": "string"},
        "params": {"type": "object"},
        "filterKey": {"type": "string"},
        "lifetime": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "until_entity_stopped"}},
                    "required": ["kind"],
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "expires_at"}, "at": {"type": "string"}},
                    "required": ["kind", "at"],
                },
                {
                    "type": "object",
                    "properties": {"kind": {"const": "manual"}},
                    "required": ["kind"],
                },
            ]
        },
        "reason": {"type": "string"},
    },
    "required": ["sourceKey"],
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    catalog = runtime.settings.event_sources

    async def list_event_sources(_request: Request) -> Response:
        return json_response(200, {"eventSources": catalog.visible() if catalog else []})

    async def put_subscription(request: Request) -> Response:
        # Existence, then the body, then the principal guard (spec/02 §3.4).
        entity = await entities.require_entity(
            runtime, request.params["type"], request.params["instanceId"]
        )
        body = validated_body(request.body, SUBSCRIPTION_BODY_SCHEMA)
        reject_principal_mutation(entity, event_sources.SUBSCRIBED)
        resolved = event_sources.resolve(
            catalog,
            entity.url,
            request.param("subscriptionId"),
            SubscriptionRequest(
                source_key=body["sourceKey"],
                bucket_key=body.get("bucketKey"),
                params=body.get("params"),
                filter_key=body.get("filterKey"),
                lifetime=body.get("lifetime"),
                reason=body.get("reason"),
            ),
        )
        result = await event_sources.upsert_subscription(runtime, entity.url, resolved)
        return json_response(200, {"txid": result.txid, "subscription": result.subscription})

    async def delete_subscription(request: Request) -> Response:
        entity = await entities.require_entity(
            runtime, request.params["type"], request.params["instanceId"]
        )
        reject_principal_mutation(entity, event_sources.UNSUBSCRIBED)
        txid = await event_sources.delete_subscription(
            runtime, entity.url, request.param("subscriptionId")
        )
        return json_response(200, {"txid": txid})

    path = "/_electric/entities/:type/:instanceId/event-source-subscriptions/:subscriptionId"
    return [
        Route("GET", "/_electric/event-sources", list_event_sources),
        Route("PUT", path, put_subscription),
        Route("DELETE", path, delete_subscription),
    ]

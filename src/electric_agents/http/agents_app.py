"""The control plane under `/_electric/` (spec/02 §2, §3.2-3.5): principal resolution, the
route table, the error envelope."""

from __future__ import annotations

import logging

from electric_agents.agents.manifests import ManifestRehydrator
from electric_agents.agents.mock_agent import MockChatAgent
from electric_agents.agents.principals import DEV_PRINCIPAL, Principal, parse_principal
from electric_agents.agents.recovery import RecoverySweep
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.errors import ApiError
from electric_agents.http import (
    routes_dispatch,
    routes_entities,
    routes_entity_bridges,
    routes_entity_types,
    routes_event_sources,
    routes_fork,
    routes_mock_agent,
    routes_runners,
    routes_schedules,
    routes_shapes,
    routes_signals,
    routes_wakes,
)
from electric_agents.http.responses import (
    Receive,
    Scope,
    Send,
    header_map,
    read_body,
    send_error,
    send_response,
)
from electric_agents.http.router import Request, Response, Route, Router, json_response, parse_query
from electric_agents.streams.subscription_service import SubscriptionService

log = logging.getLogger(__name__)

MAX_CONTROL_BODY_BYTES = 4 * 1024 * 1024


async def health(_request: Request) -> Response:
    return json_response(200, {"status": "ok"})


def control_routes(
    runtime: AgentsRuntime,
    subscriptions: SubscriptionService | None = None,
    mock_agent: MockChatAgent | None = None,
) -> list[Route]:
    """Every `/_electric` route, in match order (spec/02 §3.8). The wake dispatch routes
    exist when the server runs its subscription service, the mock agent's when enabled."""
    dispatch = routes_dispatch.routes(runtime, subscriptions) if subscriptions else []
    mock = routes_mock_agent.routes(mock_agent) if mock_agent else []
    runtime.add_worker("manifest-rehydration", ManifestRehydrator(runtime).run)
    runtime.add_worker("recovery-sweep", RecoverySweep(runtime).run)
    return [
        *mock,
        Route("GET", "/_electric/health", health),
        Route("HEAD", "/_electric/health", health),
        *routes_entity_types.routes(runtime),
        *routes_signals.routes(runtime),
        *routes_entity_bridges.routes(runtime),
        *routes_entities.routes(runtime),
        *routes_fork.routes(runtime),
        *routes_runners.routes(runtime),
        *routes_wakes.routes(runtime),
        *routes_schedules.routes(runtime),
        *routes_event_sources.routes(runtime),
        *routes_shapes.routes(runtime),
        *dispatch,
    ]


class AgentsApp:
    def __init__(
        self,
        runtime: AgentsRuntime,
        subscriptions: SubscriptionService | None = None,
        mock_agent: MockChatAgent | None = None,
    ) -> None:
        self.runtime = runtime
        self.router = Router(control_routes(runtime, subscriptions, mock_agent))

    def resolve_principal(self, headers: dict[str, str]) -> Principal:
        raw = headers.get("electric-principal")
        principal = parse_principal(raw) if raw else None
        if principal is not None:
            return principal
        if self.runtime.settings.require_principal:
            raise ApiError(401, "UNAUTHORIZED", "Missing Electric-Principal")
        return DEV_PRINCIPAL

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        path = raw_path.split("?", 1)[0]
        if method == "OPTIONS":
            await send_response(send, 204)
            return
        try:
            headers = header_map(scope["headers"])
            principal = self.resolve_principal(headers)
            found = self.router.resolve(method, path)
            if found is None:
                await send_response(send, 404)
                return
            handler, params = found
            body = await read_body(receive, MAX_CONTROL_BODY_BYTES)
            request = Request(
                method=method,
                path=path,
                query=parse_query(scope.get("query_string", b"")),
                headers=headers,
                body=body,
                principal=principal,
                params=params,
            )
            response = await handler(request)
        except ApiError as error:
            await send_error(send, error)
            return
        await send_response(send, response.status, response.headers, response.body)

"""`POST /_electric/mock-agent-handler` (spec/02 §2.2, §4.14): the mock `chat` agent's
webhook. Only routed when the mock agent is enabled; otherwise the path is a plain 404."""

from __future__ import annotations

from electric_agents.agents.mock_agent import MOCK_AGENT_HANDLER_PATH, MockChatAgent
from electric_agents.http.router import Request, Response, Route, json_response


def routes(mock_agent: MockChatAgent) -> list[Route]:
    async def handle_wake(request: Request) -> Response:
        return json_response(200, mock_agent.accept_webhook(request.headers, request.body))

    return [Route("POST", MOCK_AGENT_HANDLER_PATH, handle_wake)]

"""`GET /_electric/electric/v1/shape` (spec/02 §3.2): the Electric shape API, served from our
own tables instead of proxied to an Electric service."""

from __future__ import annotations

from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.responses import JSON_CONTENT_TYPE
from electric_agents.http.router import Request, Response, Route
from electric_agents.shapes.log import ShapeLog
from electric_agents.shapes.service import ShapeRequest, ShapeService

# Electric holds a live request about 20 s; the server's long-poll setting caps it so
# tests (and operators) can shorten it.
MAX_LIVE_TIMEOUT_S = 20.0


def routes(runtime: AgentsRuntime) -> list[Route]:
    shape_log = ShapeLog(runtime.pool)
    runtime.add_worker("shape-log-sequencer", shape_log.run)
    runtime.live_request_enders.append(shape_log.end_waits)
    live_timeout_s = min(MAX_LIVE_TIMEOUT_S, runtime.settings.long_poll_timeout_ms / 1000)
    service = ShapeService(runtime.pool, shape_log, live_timeout_s)

    async def get_shape(request: Request) -> Response:
        shape_request = ShapeRequest.from_query(request.query)
        answer = await service.serve(shape_request, runtime.tenant_id, request.principal.url)
        return Response(
            answer.status, answer.body, {"Content-Type": JSON_CONTENT_TYPE, **answer.headers}
        )

    return [Route("GET", "/_electric/electric/v1/shape", get_shape)]

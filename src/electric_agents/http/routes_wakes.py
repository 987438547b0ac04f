"""`POST /_electric/wake` (spec/02 §3.2, spec/03 §4.1 #2): register a server-side wake.

Also starts the wake deadline worker (debounce flushes and timeouts, agents/wakes.py).
"""

from __future__ import annotations

from typing import Any

from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.wake_registration_store import WakeSpec
from electric_agents.agents.wakes import WakeDeadlineWorker, register_wake
from electric_agents.http.api_schemas import MILLISECONDS_SCHEMA, WAKE_CONDITION_SCHEMA
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route

WAKE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "subscriberUrl": {"type": "string"},
        "sourceUrl": {"type": "string"},
        "condition": WAKE_CONDITION_SCHEMA,
        "debounceMs": MILLISECONDS_SCHEMA,
        "timeoutMs": MILLISECONDS_SCHEMA,
        "includeResponse": {"type": "boolean"},
        "manifestKey": {"type": "string"},
    },
    "required": ["subscriberUrl", "sourceUrl", "condition"],
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    runtime.add_worker("wake-deadlines", WakeDeadlineWorker(runtime).run)

    async def register(request: Request) -> Response:
        body = validated_body(request.body, WAKE_BODY_SCHEMA)
        # No auth or ownership check, as in the reference (spec/03 §4.1 #2).
        await register_wake(runtime, wake_spec(body))
        return Response(204)

    return [Route("POST", "/_electric/wake", register)]


def wake_spec(body: dict[str, Any]) -> WakeSpec:
    return WakeSpec(
        subscriber_url=body["subscriberUrl"],
        source_url=body["sourceUrl"],
        condition=body["condition"],
        # Whole milliseconds; 0 (or less) means none (spec/03 §4.1).
        debounce_ms=max(0, int(body.get("debounceMs", 0))),
        timeout_ms=max(0, int(body.get("timeoutMs", 0))),
        include_response=body.get("includeResponse", True),
        manifest_key=body.get("manifestKey"),
    )

"""Routes for `/_electric/entity-types` (spec/02 §3.3)."""

from __future__ import annotations

from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.router import Route


def routes(runtime: AgentsRuntime) -> list[Route]:
    del runtime
    return []

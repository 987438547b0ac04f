"""Routes for `/_electric/entities` except signals (spec/02 §3.4)."""

from __future__ import annotations

from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.router import Route


def routes(runtime: AgentsRuntime) -> list[Route]:
    del runtime
    return []

"""Routes for signals and legacy kill (spec/02 §3.4, spec/03 §2)."""

from __future__ import annotations

from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.http.router import Route


def routes(runtime: AgentsRuntime) -> list[Route]:
    del runtime
    return []

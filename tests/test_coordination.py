"""Fan-out / fan-in over shared state (spec/04 §1.18 coordination patterns) across two
`electric-agents serve` processes on one database: a coordinator watches a shared-state
stream that many workers write to concurrently, through either process, and is woken for
every result exactly once, whichever process took the append.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from agents_support import eventually, read_events, unique_id
from conftest import ServerFactory

pytestmark = pytest.mark.timeout(120)

WORKERS = 12
RESULTS_PER_WORKER = 5


async def test_fan_in_over_shared_state_wakes_once_per_result_across_two_processes(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    first = server_factory("serve")
    second = server_factory("serve")
    kind = unique_id("coordinator").replace("-", "_")
    registered = await http.post(
        first.origin + "/_electric/entity-types", json={"name": kind, "description": "t"}
    )
    assert registered.status_code == 201
    coordinator = f"/{kind}/{unique_id()}"
    spawned = await http.put(first.origin + f"/_electric/entities{coordinator}", json={})
    assert spawned.status_code == 201, spawned.text
    board = f"/_electric/shared-state/{unique_id('board')}"
    created = await http.put(first.origin + board, headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    watch = await http.post(
        second.origin + "/_electric/wake",
        json={
            "subscriberUrl": coordinator,
            "sourceUrl": board,
            "condition": {"on": "change", "collections": ["result"], "ops": ["insert"]},
        },
    )
    assert watch.status_code == 204, watch.text

    async def worker(index: int) -> None:
        # Each worker alternates processes; progress notes never wake the coordinator.
        for n in range(RESULTS_PER_WORKER):
            origin = (first, second)[(index + n) % 2].origin
            events: list[dict[str, Any]] = [
                {
                    "type": "progress",
                    "key": f"p-{index}-{n}",
                    "value": n,
                    "headers": {"operation": "insert"},
                },
                {
                    "type": "result",
                    "key": f"r-{index}-{n}",
                    "value": {"worker": index, "n": n},
                    "headers": {"operation": "insert"},
                },
            ]
            answer = await http.post(origin + board, json=events)
            assert answer.status_code in (200, 204), answer.text

    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    expected = {f"r-{i}-{n}" for i in range(WORKERS) for n in range(RESULTS_PER_WORKER)}

    wakes: list[dict[str, Any]] = []

    async def all_woken() -> bool:
        nonlocal wakes
        events = await read_events(http, first, f"{coordinator}/main")
        wakes = [e for e in events if e.get("type") == "wake"]
        return len(wakes) >= len(expected)

    await eventually(all_woken, f"{len(expected)} wakes on {coordinator}")
    await asyncio.sleep(0.5)  # nothing more may arrive
    wakes = [
        e for e in await read_events(http, second, f"{coordinator}/main") if e.get("type") == "wake"
    ]
    keys = [change["key"] for wake in wakes for change in wake["value"]["changes"]]
    assert sorted(keys) == sorted(expected)  # every result once, no progress note
    assert all(wake["value"]["source"] == board for wake in wakes)

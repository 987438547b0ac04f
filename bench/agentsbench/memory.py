"""Scenario 7: server RSS growth with N idle entities, on a freshly started server.

RSS of the server process alone (its embedded Postgres is reported separately, as summed
PSS) once idle, then after spawning N entities (no dispatch policy, so nothing wakes them),
each time after the RSS has settled. Goal: under 50 MB of growth for 100k entities.
"""

from __future__ import annotations

import asyncio
import time

from agentsbench.client import AgentsClient
from agentsbench.config import AgentsBenchConfig
from agentsbench.load import drive
from agentsbench.throughput import bench_name
from streambench.model import WorkloadResult
from streambench.processes import MemorySample, ResourceProbe
from streambench.servers import RunningServer
from streambench.wire import session

SECTION = "7. memory with idle entities"
MIB = 1024 * 1024
SETTLE_INTERVAL_S = 0.5
SETTLE_SAMPLES = 4  # stable = RSS moved less than SETTLE_BAND over this many samples
SETTLE_BAND = 256 * 1024
SETTLE_MAX_S = 15.0


async def settled_memory(probe: ResourceProbe) -> MemorySample:
    """The server's memory once its RSS stops moving (or after SETTLE_MAX_S): a moment for
    in-flight work, buffers and the garbage collector to finish after the last request."""
    samples = [probe.memory()]
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_INTERVAL_S)
        samples.append(probe.memory())
        recent = [s.server_rss for s in samples[-SETTLE_SAMPLES:]]
        if len(recent) == SETTLE_SAMPLES and max(recent) - min(recent) < SETTLE_BAND:
            break
    return samples[-1]


def _add_sample(out: WorkloadResult, label: str, sample: MemorySample) -> None:
    out.add(SECTION, f"{label}: server RSS", "MiB", sample.server_rss / MIB, "lower")
    if sample.postgres_pss is not None:
        out.add(SECTION, f"{label}: Postgres PSS", "MiB", sample.postgres_pss / MIB, "lower")


async def idle_entities(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    async with session(0) as http:
        client = AgentsClient(server.base_url, http)
        type_name = bench_name("idle")
        await client.register_type(type_name)
        # One spawn first, so the baseline already holds what the first request loads
        # (type cache, principal entity, pool connections) rather than counting it as growth.
        await client.spawn(type_name, "baseline")
        idle = await settled_memory(probe)
        _add_sample(out, "idle, fresh server", idle)

        async def spawn_one(_: int, sequence: int) -> None:
            await client.spawn(type_name, f"idle-{sequence}")

        run = await drive(probe, spawn_one, config.memory_concurrency,
                          duration_s=config.memory_deadline_s, count=config.entities)  # fmt: skip
    after = await settled_memory(probe)
    spawned = run.completed
    out.add(SECTION, f"entities spawned (of {config.entities})", "count", spawned, "higher")
    _add_sample(out, f"after {spawned} entities", after)
    grown = after.server_rss - idle.server_rss
    out.add(SECTION, "server RSS growth", "MiB", grown / MIB, "lower")
    out.add(SECTION, "server RSS per entity", "bytes", grown / max(1, spawned), "lower")
    if after.postgres_pss is not None and idle.postgres_pss is not None:
        pg_grown = after.postgres_pss - idle.postgres_pss
        out.add(SECTION, "Postgres PSS per entity", "bytes", pg_grown / max(1, spawned), "lower")
    out.add(SECTION, f"spawn {spawned} entities at concurrency {config.memory_concurrency}",
            "spawns/s", run.ops_per_s, "higher")  # fmt: skip
    out.add(SECTION, "spawn errors", "count", sum(run.errors.values()), "lower")
    out.raw = {
        "entities_requested": config.entities,
        "entities_spawned": spawned,
        "spawn": run.as_dict(),
        "idle": idle.__dict__,
        "after": after.__dict__,
    }
    return out

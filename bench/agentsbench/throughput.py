"""Scenarios 1-2: spawns/s and sends/s at each concurrency, on entities of a type without a
dispatch policy, so the figures are the control plane's own cost (spec/02 §3.4)."""

from __future__ import annotations

import uuid

from agentsbench.client import AgentsClient
from agentsbench.config import AgentsBenchConfig
from agentsbench.load import drive
from streambench.model import WorkloadResult
from streambench.servers import RunningServer
from streambench.wire import session

SPAWN_SECTION = "1. spawn (PUT /_electric/entities/<type>/<id>)"
SEND_SECTION = "2. send (POST /_electric/entities/<type>/<id>/send)"
# About the size of a short chat message in the runtime's inbox payloads.
SEND_PAYLOAD = {"text": "x" * 80}


def bench_name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


async def spawn_rate(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    async with session(0) as http:
        client = AgentsClient(server.base_url, http)
        type_name = bench_name("spawn")
        await client.register_type(type_name)
        for concurrency in config.concurrencies:

            async def spawn_one(_: int, sequence: int, prefix: str = f"c{concurrency}") -> None:
                await client.spawn(type_name, f"{prefix}-{sequence}")

            run = await drive(probe, spawn_one, concurrency,
                              duration_s=config.duration_s, warmup_s=config.warmup_s)  # fmt: skip
            label = f"concurrency {concurrency}"
            run.add_metrics(out, SPAWN_SECTION, label, "spawns/s")
            out.raw[label] = run.as_dict()
    return out


async def send_rate(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    """Each worker sends to an entity of its own, so workers do not queue on one stream."""
    out = WorkloadResult()
    probe = server.probe()
    async with session(0) as http:
        client = AgentsClient(server.base_url, http)
        type_name = bench_name("send")
        await client.register_type(type_name)
        entities = [
            await client.spawn(type_name, f"target-{i}") for i in range(max(config.concurrencies))
        ]

        async def send_one(worker: int, _: int) -> None:
            await client.send(entities[worker], SEND_PAYLOAD)

        for concurrency in config.concurrencies:
            run = await drive(probe, send_one, concurrency,
                              duration_s=config.duration_s, warmup_s=config.warmup_s)  # fmt: skip
            label = f"concurrency {concurrency}"
            run.add_metrics(out, SEND_SECTION, label, "sends/s")
            out.raw[label] = run.as_dict()
    return out

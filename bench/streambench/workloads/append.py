"""Workload 1: append throughput on one stream, 256 B JSON, 1/8/32 keep-alive connections.

Each connection is a sequential POST loop in the Node load generator, for a fixed duration
after a short warm-up, once without and once with idempotent-producer headers
(`Producer-Id` per connection, epoch 0, seq counting from 0). Every run gets a fresh stream.
"""

from __future__ import annotations

import uuid

from streambench import wire
from streambench.loader import run_loader
from streambench.model import BenchConfig, WorkloadResult
from streambench.servers import RunningServer

SECTION = "1. append, 256 B JSON, one stream"
CONTENT_TYPE = "application/json"


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    for connections in config.append_connections:
        for producer in (False, True):
            run_id = uuid.uuid4().hex[:8]
            mode = "producer" if producer else "plain"
            url = server.stream_url(f"bench-append-{connections}-{mode}-{run_id}")
            async with wire.session() as http:
                await wire.create_stream(http, url, CONTENT_TYPE)
            args = [
                "--mode", "append",
                "--url", url,
                "--connections", str(connections),
                "--duration-s", str(config.duration_s),
                "--warmup-s", str(config.warmup_s),
                "--body-bytes", str(config.append_body_bytes),
                "--content-type", CONTENT_TYPE,
                "--producer-prefix", f"bench-{run_id}",
            ]  # fmt: skip
            if producer:
                args.append("--producer")
            loaded = await run_loader(args, probe, config.warmup_s + config.duration_s + 60)
            result = loaded.result
            latency = result["latency_ms"]
            label = f"{connections} conn{'s' if connections > 1 else ''}, {mode}"
            out.add(SECTION, f"{label}: appends/s", "ops/s", result["ops_per_s"], "higher")
            out.add(SECTION, f"{label}: p50", "ms", latency["p50"], "lower")
            out.add(SECTION, f"{label}: p99", "ms", latency["p99"], "lower")
            if loaded.cpu is not None:
                out.add_cpu(SECTION, label, loaded.cpu)
                if loaded.loader_cores is not None:
                    out.add(SECTION, f"{label}: load generator CPU", "cores", loaded.loader_cores)
                other = loaded.cpu.other_cores
                out.add(SECTION, f"{label}: other processes CPU (noise)", "cores", other)
                if result["ok"]:
                    # Total server-side CPU (Postgres included for ours) per measured append.
                    cpu_s = loaded.cpu.server_s + (loaded.cpu.postgres_s or 0.0)
                    per_append_us = cpu_s / result["ok"] * 1e6
                    out.add(SECTION, f"{label}: CPU per append", "us", per_append_us, "lower")
            if result["errors"]:
                out.add(SECTION, f"{label}: errors", "requests", result["errors"], "lower")
            out.raw[f"{connections}-{mode}"] = {
                "loader": result,
                "cpu": loaded.cpu.as_dict() if loaded.cpu else None,
                "loader_cores": loaded.loader_cores,
            }
    return out

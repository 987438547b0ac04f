"""Workload 4: catch-up reads. Pre-fill 2000 x 1 KiB octet-stream messages, then N clients at
once read from `offset=-1`, following `Stream-Next-Offset` until `Stream-Up-To-Date: true`
(a server may answer in several chunks); that round is repeated `catchup_rounds` times on the
same connections, after one untimed round. Aggregate MB/s (1 MB = 10^6 bytes) is all bytes
over the summed time from each round's start until its last client finished.

The readers run in the Node load generator: one Python process reading 50 responses of 2 MB
was the limit in earlier sessions (our server sat at 0.2 cores), so the figure measured the
client, not the servers.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from streambench import wire
from streambench.loader import run_loader
from streambench.model import BenchConfig, WorkloadResult
from streambench.servers import RunningServer

SECTION = "4. catch-up read"
CONTENT_TYPE = "application/octet-stream"
PREFILL_CONNECTIONS = 8
LOADER_TIMEOUT_S = 300.0


async def _prefill(url: str, messages: int, message_bytes: int) -> float:
    """Append `messages` random messages over a few connections; returns appends/s."""
    body = os.urandom(message_bytes)
    counter = iter(range(messages))
    async with wire.session(connections=PREFILL_CONNECTIONS) as http:
        await wire.create_stream(http, url, CONTENT_TYPE)
        started = time.perf_counter()

        async def worker() -> None:
            for _ in counter:
                await wire.append(http, url, body, CONTENT_TYPE)

        await asyncio.gather(*(worker() for _ in range(PREFILL_CONNECTIONS)))
        return messages / (time.perf_counter() - started)


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    url = server.stream_url(f"bench-catchup-{uuid.uuid4().hex[:8]}")
    expected_bytes = config.catchup_messages * config.catchup_message_bytes
    prefill_rate = await _prefill(url, config.catchup_messages, config.catchup_message_bytes)
    out.raw["prefill_appends_per_s"] = prefill_rate
    for clients in config.catchup_clients:
        args = [
            "--mode", "catchup",
            "--url", url,
            "--connections", str(clients),
            "--rounds", str(config.catchup_rounds),
            "--expected-bytes", str(expected_bytes),
        ]  # fmt: skip
        loaded = await run_loader(args, probe, LOADER_TIMEOUT_S)
        result = loaded.result
        latency = result["latency_ms"]
        label = f"{clients} clients"
        out.add(SECTION, f"{label}: aggregate", "MB/s", result["mb_per_s"], "higher")
        out.add(SECTION, f"{label}: per-client p50", "ms", latency["p50"], "lower")
        out.add(SECTION, f"{label}: per-client p99", "ms", latency["p99"], "lower")
        out.add(SECTION, f"{label}: requests per client", "req", result["requests_per_client"][0])
        if loaded.cpu is not None:
            out.add_cpu(SECTION, label, loaded.cpu)
            if loaded.loader_cores is not None:
                out.add(SECTION, f"{label}: load generator CPU", "cores", loaded.loader_cores)
        if result["incomplete"]:
            out.add(SECTION, f"{label}: incomplete reads", "clients", result["incomplete"], "lower")
        out.raw[str(clients)] = {
            "expected_bytes_per_client": expected_bytes,
            "loader": result,
            "cpu": loaded.cpu.as_dict() if loaded.cpu else None,
            "loader_cores": loaded.loader_cores,
        }
    return out

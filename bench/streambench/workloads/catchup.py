"""Workload 4: catch-up reads. Pre-fill 2000 x 1 KiB octet-stream messages, then N clients at
once read from `offset=-1`, following `Stream-Next-Offset` until `Stream-Up-To-Date: true`
(a server may answer in several chunks). Aggregate MB/s (1 MB = 10^6 bytes) is all bytes
over the time until the last client finished. One untimed single-client read comes first.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass

import aiohttp

from streambench import wire
from streambench.model import BenchConfig, WorkloadResult
from streambench.servers import RunningServer
from streambench.stats import summarize_ms

SECTION = "4. catch-up read"
CONTENT_TYPE = "application/octet-stream"
PREFILL_CONNECTIONS = 8
MAX_REQUESTS_PER_CLIENT = 100_000
CLIENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ClientRead:
    elapsed_ms: float
    bytes_read: int
    requests: int


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


async def _read_all(http: aiohttp.ClientSession, url: str, go: asyncio.Event) -> ClientRead:
    await wire.tail_offset(http, url)  # open the keep-alive connection before the start
    await go.wait()
    started = time.perf_counter()
    offset, total, requests = "-1", 0, 0
    while requests < MAX_REQUESTS_PER_CLIENT:
        async with http.get(url, params={"offset": offset}) as resp:
            body = await resp.read()
            requests += 1
            if resp.status != 200:
                raise wire.ProtocolError(f"catch-up GET -> {resp.status}")
            total += len(body)
            offset = resp.headers["Stream-Next-Offset"]
            if resp.headers.get("Stream-Up-To-Date") == "true":
                break
    return ClientRead((time.perf_counter() - started) * 1000, total, requests)


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    url = server.stream_url(f"bench-catchup-{uuid.uuid4().hex[:8]}")
    expected_bytes = config.catchup_messages * config.catchup_message_bytes
    prefill_rate = await _prefill(url, config.catchup_messages, config.catchup_message_bytes)
    out.raw["prefill_appends_per_s"] = prefill_rate
    # One untimed read first, so neither a cold JIT nor cold caches land in the first row.
    async with wire.session(timeout_s=CLIENT_TIMEOUT_S) as http:
        warm_go = asyncio.Event()
        warm_go.set()
        await _read_all(http, url, warm_go)
    for clients in config.catchup_clients:
        go = asyncio.Event()
        sessions = [wire.session(timeout_s=CLIENT_TIMEOUT_S) for _ in range(clients)]
        tasks = [asyncio.create_task(_read_all(s, url, go)) for s in sessions]
        try:
            await asyncio.sleep(0.3)  # let every client open its connection
            cpu_start = probe.cpu()
            started = time.perf_counter()
            go.set()
            reads = await asyncio.gather(*tasks)
            wall_s = time.perf_counter() - started
            cpu = probe.usage(cpu_start, probe.cpu())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for http in sessions:
                await http.close()
        total_bytes = sum(r.bytes_read for r in reads)
        incomplete = sum(1 for r in reads if r.bytes_read != expected_bytes)
        summary = summarize_ms([r.elapsed_ms for r in reads])
        label = f"{clients} clients"
        out.add(SECTION, f"{label}: aggregate", "MB/s", total_bytes / wall_s / 1e6, "higher")
        out.add(SECTION, f"{label}: per-client p50", "ms", summary["p50"], "lower")
        out.add(SECTION, f"{label}: per-client p99", "ms", summary["p99"], "lower")
        out.add(SECTION, f"{label}: requests per client", "req", reads[0].requests)
        out.add_cpu(SECTION, label, cpu)
        if incomplete:
            out.add(SECTION, f"{label}: incomplete reads", "clients", incomplete, "lower")
        out.raw[str(clients)] = {
            "wall_s": wall_s,
            "bytes": total_bytes,
            "expected_bytes_per_client": expected_bytes,
            "incomplete_clients": incomplete,
            "requests_per_client": sorted({r.requests for r in reads}),
            "per_client_ms": summary,
            "cpu": cpu.as_dict(),
        }
    return out

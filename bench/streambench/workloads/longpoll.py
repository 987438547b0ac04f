"""Workload 2: append -> long-poll delivery latency.

A reader parks a long-poll at the tail (`?offset=<tail>&live=long-poll`); once it has had
time to reach the server, a writer on another connection appends one message. The figure is
the time from just before the POST is sent until the reader has the response body.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp

from streambench import wire
from streambench.model import BenchConfig, WorkloadResult
from streambench.servers import RunningServer
from streambench.stats import summarize_ms

SECTION = "2. append -> long-poll delivery"
CONTENT_TYPE = "application/octet-stream"
PAYLOAD_BYTES = 100
# Long enough for the GET to reach the server and park on a loopback connection.
PARK_DELAY_S = 0.01


async def _long_poll(
    http: aiohttp.ClientSession, url: str, offset: str
) -> tuple[int, bytes, str, float]:
    """One long-poll; returns (status, body, next offset, perf_counter when the body was in)."""
    params = {"live": "long-poll", "offset": offset}
    async with http.get(url, params=params) as resp:
        body = await resp.read()
        received = time.perf_counter()
        return resp.status, body, resp.headers.get("Stream-Next-Offset", offset), received


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    url = server.stream_url(f"bench-longpoll-{uuid.uuid4().hex[:8]}")
    timeout_s = config.long_poll_timeout_ms / 1000 + 10
    latencies: list[float] = []
    append_rtts: list[float] = []
    misses = 0
    async with wire.session(timeout_s=timeout_s) as reader, wire.session() as writer:
        tail = await wire.create_stream(writer, url, CONTENT_TYPE)
        # Warm both keep-alive connections so no iteration pays for a TCP handshake.
        await wire.tail_offset(reader, url)
        await wire.tail_offset(writer, url)
        cpu_start = probe.cpu()
        for i in range(config.longpoll_iterations):
            payload = f"{i:08d}".encode().ljust(PAYLOAD_BYTES, b".")
            poll = asyncio.create_task(_long_poll(reader, url, tail))
            await asyncio.sleep(PARK_DELAY_S)
            sent = time.perf_counter()
            await wire.append(writer, url, payload, CONTENT_TYPE)
            append_rtts.append((time.perf_counter() - sent) * 1000)
            status, body, next_offset, received = await poll
            if status == 200 and body == payload:
                latencies.append((received - sent) * 1000)
            else:
                misses += 1
            tail = await wire.tail_offset(writer, url) if status != 200 else next_offset
        cpu = probe.usage(cpu_start, probe.cpu())
    summary = summarize_ms(latencies)
    out.add(SECTION, "delivery p50", "ms", summary["p50"], "lower")
    out.add(SECTION, "delivery p90", "ms", summary["p90"], "lower")
    out.add(SECTION, "delivery p99", "ms", summary["p99"], "lower")
    out.add(SECTION, "append RTT p50 (for context)", "ms", summarize_ms(append_rtts)["p50"])
    out.add(SECTION, "missed deliveries", "count", misses, "lower")
    out.add_cpu(SECTION, "whole run", cpu)
    out.raw = {
        "iterations": config.longpoll_iterations,
        "delivery_ms": summary,
        "append_rtt_ms": summarize_ms(append_rtts),
        "misses": misses,
        "cpu": cpu.as_dict(),
    }
    return out

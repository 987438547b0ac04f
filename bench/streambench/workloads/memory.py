"""Workload 5: memory, on a freshly started server.

RSS of the server process alone (no children) when idle, after creating N small streams
(PUT with a 1-byte body, done by the Node load generator), and at its peak while 100 SSE
readers follow one stream that receives 50 appends/s. Our server's Postgres is a separate
process tree; its summed PSS is reported on its own rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from streambench.loader import run_loader
from streambench.model import BenchConfig, WorkloadResult
from streambench.processes import MemorySample, ResourceProbe
from streambench.servers import RunningServer
from streambench.workloads.fanout import fan_out

SECTION = "5. memory"
CREATE_CONNECTIONS = 16
SETTLE_S = 1.0
SAMPLE_INTERVAL_S = 0.2
MIB = 1024 * 1024


async def _sample_peak(probe: ResourceProbe, peak: list[MemorySample]) -> None:
    """Keep the largest server RSS (and the Postgres PSS seen with it) in `peak[0]`."""
    while True:
        sample = probe.memory()
        if not peak or sample.server_rss > peak[0].server_rss:
            peak[:] = [sample]
        await asyncio.sleep(SAMPLE_INTERVAL_S)


def _add_sample(out: WorkloadResult, label: str, sample: MemorySample) -> None:
    out.add(SECTION, f"{label}: server RSS", "MiB", sample.server_rss / MIB, "lower")
    if sample.postgres_pss is not None:
        out.add(SECTION, f"{label}: Postgres PSS", "MiB", sample.postgres_pss / MIB, "lower")


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    probe = server.probe()
    await asyncio.sleep(SETTLE_S)
    idle = probe.memory()
    _add_sample(out, "idle, fresh server", idle)

    streams = config.memory_streams
    prefix = server.stream_url(f"bench-mem-{uuid.uuid4().hex[:8]}")
    args = ["--mode", "create", "--url", prefix,
            "--connections", str(CREATE_CONNECTIONS), "--count", str(streams)]  # fmt: skip
    created = await run_loader(args, probe, timeout_s=max(120.0, streams / 200))
    await asyncio.sleep(SETTLE_S)
    after_create = probe.memory()
    _add_sample(out, f"after {streams} streams", after_create)
    grown = after_create.server_rss - idle.server_rss
    out.add(SECTION, "server RSS per stream", "bytes", grown / max(1, streams), "lower")
    if after_create.postgres_pss is not None and idle.postgres_pss is not None:
        pg_grown = after_create.postgres_pss - idle.postgres_pss
        out.add(SECTION, "Postgres PSS per stream", "bytes", pg_grown / max(1, streams), "lower")
    out.add(SECTION, f"create {streams} streams", "streams/s", created.result["ops_per_s"],
            "higher")  # fmt: skip

    peak: list[MemorySample] = []
    sampler = asyncio.create_task(_sample_peak(probe, peak))
    try:
        followed = await fan_out(
            server,
            config.memory_sse_readers,
            config.memory_sse_seconds,
            config.fanout_rate_per_s,
            config.fanout_payload_bytes,
        )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    readers = config.memory_sse_readers
    _add_sample(out, f"peak with {readers} SSE readers", peak[0])
    out.add(SECTION, f"{readers} SSE readers: server RSS growth", "MiB",
            (peak[0].server_rss - after_create.server_rss) / MIB, "lower")  # fmt: skip

    out.raw = {
        "streams": streams,
        "create": created.result,
        "idle": idle.__dict__,
        "after_create": after_create.__dict__,
        "sse_peak": peak[0].__dict__,
        "sse_readers": readers,
        "sse_delivered": followed.delivered,
        "sse_expected": followed.expected,
    }
    return out

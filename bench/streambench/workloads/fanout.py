"""Workload 3: SSE fan-out. 1, 10 and 100 readers follow one text/plain stream
(`?offset=now&live=sse`) while a writer appends at a fixed rate with its send time in the
payload; the figure is end-to-end delivery latency over every (reader, message) pair.

Readers and writer share one Python process and clock (`perf_counter_ns`). With 100 readers
the client parses about 5 000 events/s, so that row includes client-side queueing; it is the
same client for every target.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

from streambench import wire
from streambench.model import BenchConfig, WorkloadResult
from streambench.processes import CpuUsage
from streambench.servers import RunningServer
from streambench.stats import summarize_ms

SECTION = "3. SSE fan-out"
CONTENT_TYPE = "text/plain"
# Payload: "#<seq>@<send perf_counter_ns>#" padded with dots. Found by regex, so several
# messages sharing one data event (a server may batch) are still counted one by one.
MARK = re.compile(r"#(\d+)@(\d+)#")
READY_TIMEOUT_S = 15.0
DRAIN_GRACE_S = 3.0


@dataclass
class Follower:
    """One SSE reader: records every marked message it receives and when."""

    ready: asyncio.Event = field(default_factory=asyncio.Event)
    seen: set[int] = field(default_factory=set)
    latencies_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    error: str | None = None

    async def follow(self, http: aiohttp.ClientSession, url: str) -> None:
        try:
            async with http.get(url, params={"offset": "now", "live": "sse"}) as resp:
                if resp.status != 200:
                    self.error = f"SSE GET -> {resp.status}"
                    return
                parser = wire.SseParser()
                async for chunk in resp.content.iter_any():
                    received_ns = time.perf_counter_ns()
                    for event in parser.feed(chunk):
                        if event.kind == "control":
                            self.ready.set()
                        elif event.kind == "data":
                            self._record(event.data, received_ns)
        except aiohttp.ClientError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.ready.set()

    def _record(self, data: str, received_ns: int) -> None:
        for seq_text, sent_text in MARK.findall(data):
            seq = int(seq_text)
            if seq in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(seq)
            self.latencies_ms.append((received_ns - int(sent_text)) / 1e6)


@dataclass
class FanoutOutcome:
    readers: int
    sent: int
    delivered: int
    duplicates: int
    reader_errors: list[str]
    latencies_ms: list[float]
    writer_seconds: float
    cpu: CpuUsage

    @property
    def writer_rate(self) -> float:
        """Appends/s the writer achieved; below the target rate when appends got slow."""
        return self.sent / self.writer_seconds if self.writer_seconds > 0 else 0.0

    @property
    def expected(self) -> int:
        return self.readers * self.sent


async def fan_out(
    server: RunningServer, readers: int, seconds: float, rate_per_s: float, payload_bytes: int
) -> FanoutOutcome:
    """Run `readers` SSE followers against one fresh stream while a paced writer appends."""
    probe = server.probe()
    url = server.stream_url(f"bench-fanout-{readers}-{uuid.uuid4().hex[:8]}")
    followers = [Follower() for _ in range(readers)]
    total = int(seconds * rate_per_s)
    async with (
        wire.session(connections=0, timeout_s=None) as reader_http,
        wire.session() as writer,
    ):
        await wire.create_stream(writer, url, CONTENT_TYPE)
        tasks = [asyncio.create_task(f.follow(reader_http, url)) for f in followers]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(f.ready.wait() for f in followers)), READY_TIMEOUT_S
            )
            cpu_start = probe.cpu()
            started = time.perf_counter()
            for seq in range(total):
                delay = started + seq / rate_per_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                head = f"#{seq}@{time.perf_counter_ns()}#".encode()
                await wire.append(writer, url, head.ljust(payload_bytes, b"."), CONTENT_TYPE)
            writer_seconds = time.perf_counter() - started
            drain_until = time.perf_counter() + DRAIN_GRACE_S
            while time.perf_counter() < drain_until and any(
                len(f.seen) < total and f.error is None for f in followers
            ):
                await asyncio.sleep(0.05)
            cpu = probe.usage(cpu_start, probe.cpu())
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return FanoutOutcome(
        readers=readers,
        sent=total,
        delivered=sum(len(f.seen) for f in followers),
        duplicates=sum(f.duplicates for f in followers),
        reader_errors=[f.error for f in followers if f.error],
        latencies_ms=[ms for f in followers for ms in f.latencies_ms],
        writer_seconds=writer_seconds,
        cpu=cpu,
    )


async def run(server: RunningServer, config: BenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    for readers in config.fanout_readers:
        outcome = await fan_out(
            server,
            readers,
            config.fanout_seconds,
            config.fanout_rate_per_s,
            config.fanout_payload_bytes,
        )
        summary = summarize_ms(outcome.latencies_ms)
        label = f"{readers} reader{'s' if readers > 1 else ''}"
        delivered = f"{label}: delivered of {outcome.expected}"
        out.add(SECTION, delivered, "msgs", outcome.delivered, "higher")
        out.add(SECTION, f"{label}: p50", "ms", summary["p50"], "lower")
        out.add(SECTION, f"{label}: p99", "ms", summary["p99"], "lower")
        out.add(SECTION, f"{label}: writer rate achieved", "ev/s", outcome.writer_rate)
        out.add_cpu(SECTION, label, outcome.cpu)
        out.raw[str(readers)] = {
            "sent": outcome.sent,
            "expected": outcome.expected,
            "delivered": outcome.delivered,
            "duplicates": outcome.duplicates,
            "reader_errors": outcome.reader_errors[:10],
            "latency_ms": summary,
            "writer_rate": outcome.writer_rate,
            "cpu": outcome.cpu.as_dict(),
        }
    return out

"""Closed-loop load from the bench process: N workers, each awaiting one request at a time,
bounded by a duration or a count (and always by a deadline).

Python drives this load (not the Node generator of the streams bench): a spawn or a send
costs the server far more than the client, and the client's own CPU is reported beside the
figures so a saturated client would show.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import psutil

from streambench.model import WorkloadResult
from streambench.processes import CpuUsage, ResourceProbe
from streambench.stats import LatencySummary, summarize_ms
from streambench.wire import ProtocolError

# (worker index, sequence number across all workers) -> one request, raising on failure
Operation = Callable[[int, int], Awaitable[None]]
MAX_ERRORS = 50  # a run that fails this often stops early; its errors are reported
STRAGGLER_GRACE_S = 30.0


@dataclass(frozen=True)
class LoadRun:
    concurrency: int
    completed: int  # successful requests that ended inside the measured window
    errors: dict[str, int]
    latency: LatencySummary
    cpu: CpuUsage
    client_s: float  # the bench process's own CPU seconds over the window

    @property
    def ops_per_s(self) -> float:
        return self.completed / self.cpu.wall_s if self.cpu.wall_s > 0 else 0.0

    @property
    def client_cores(self) -> float:
        return self.client_s / self.cpu.wall_s if self.cpu.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency,
            "completed": self.completed,
            "ops_per_s": self.ops_per_s,
            "errors": self.errors,
            "latency_ms": self.latency,
            "cpu": self.cpu.as_dict(),
            "client_cpu_s": self.client_s,
        }

    def add_metrics(self, out: WorkloadResult, section: str, label: str, unit: str) -> None:
        out.add(section, f"{label}: {unit}", "ops/s", self.ops_per_s, "higher")
        out.add(section, f"{label}: p50", "ms", self.latency["p50"], "lower")
        out.add(section, f"{label}: p99", "ms", self.latency["p99"], "lower")
        out.add(section, f"{label}: errors", "count", sum(self.errors.values()), "lower")
        out.add_cpu(section, label, self.cpu)
        out.add(section, f"{label}: bench client CPU", "cores", self.client_cores)
        out.add(section, f"{label}: other processes CPU (noise)", "cores", self.cpu.other_cores)


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def drive(
    probe: ResourceProbe,
    operation: Operation,
    concurrency: int,
    *,
    duration_s: float,
    warmup_s: float = 0.0,
    count: int | None = None,
) -> LoadRun:
    """Run `operation` from `concurrency` workers: for `warmup_s` unmeasured, then measured
    until `duration_s` has passed or, with `count`, until that many were issued."""
    bench = psutil.Process()
    stop = asyncio.Event()
    issued = 0
    window: list[float] = []  # [start] while measuring, [start, end] after
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def worker(index: int) -> None:
        nonlocal issued
        while not stop.is_set() and (count is None or issued < count):
            sequence = issued
            issued += 1
            started = time.perf_counter()
            try:
                await operation(index, sequence)
            except (ProtocolError, aiohttp.ClientError, TimeoutError) as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1
                if errors.total() >= MAX_ERRORS:
                    stop.set()
                continue
            ended = time.perf_counter()
            if len(window) == 1:  # ended inside the measured window
                latencies.append((ended - started) * 1000)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        start = probe.cpu()
        client_start = _cpu_seconds(bench)
        window.append(start.at)
        await asyncio.wait(tasks, timeout=duration_s)
        end = probe.cpu()
        client_end = _cpu_seconds(bench)
        window.append(end.at)
        stop.set()
        await asyncio.wait(tasks, timeout=STRAGGLER_GRACE_S)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    # A worker that died of anything but a counted request failure is a bench bug: surface it.
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    if not latencies:
        first = next(iter(errors), "no request completed")
        raise ProtocolError(f"nothing completed at concurrency {concurrency}: {first}")
    return LoadRun(
        concurrency=concurrency,
        completed=len(latencies),
        errors=dict(errors),
        latency=summarize_ms(latencies),
        cpu=ResourceProbe.usage(start, end),
        client_s=client_end - client_start,
    )

"""Runs the Node load generator (bench/load/append-load.mjs) and samples server CPU around it.

The generator prints `measure-start` / `measure-end` marker lines around its measured window
(after warm-up) and a final `result` line. Server CPU is sampled at the markers so it covers
exactly the window the figures come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from streambench.processes import CpuUsage, ResourceProbe
from streambench.servers import LOAD_DIR, node_executable

LOADER_SCRIPT = LOAD_DIR / "append-load.mjs"


class LoaderError(RuntimeError):
    pass


@dataclass(frozen=True)
class LoaderRun:
    result: dict[str, Any]
    cpu: CpuUsage | None  # the server's (and its Postgres's) CPU over the measured window
    loader_s: float  # the generator's own CPU seconds over that window

    @property
    def loader_cores(self) -> float | None:
        """Near 1.0 means the (single-threaded) generator, not the server, is the limit."""
        if self.cpu is None or self.cpu.wall_s <= 0:
            return None
        return self.loader_s / self.cpu.wall_s


async def run_loader(args: list[str], probe: ResourceProbe, timeout_s: float) -> LoaderRun:
    argv = [node_executable(), str(LOADER_SCRIPT), *args, "--timeout-s", str(int(timeout_s))]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=LOAD_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    start = end = None
    loader_start = loader_end = 0.0
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout_s + 60
    try:
        while result is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoaderError(f"load generator timed out: {' '.join(args)}")
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=remaining)
            if not line:
                stderr = (await proc.stderr.read()).decode(errors="replace")
                raise LoaderError(f"load generator exited early: {stderr.strip()[-2000:]}")
            message = json.loads(line)
            match message.get("event"):
                case "measure-start":
                    start, loader_start = probe.cpu(), float(message["cpu_s"])
                case "measure-end":
                    end, loader_end = probe.cpu(), float(message["cpu_s"])
                case "result":
                    result = message
        await asyncio.wait_for(proc.wait(), timeout=30)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if start is None or end is None:
        return LoaderRun(result, None, 0.0)
    return LoaderRun(result, ResourceProbe.usage(start, end), loader_end - loader_start)

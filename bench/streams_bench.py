"""Durable Streams benchmark: our Python server against the Node reference, in one run.

    .venv/bin/python bench/streams_bench.py [--targets ours,ref-memory,ref-file]
        [--duration 10] [--quick] [--out bench/results/<timestamp>.json]

Workloads (see docs/benchmarks.md): 1. append throughput at 1/8/32 connections with and
without producer headers (load from a Node keep-alive generator), 2. append -> long-poll
latency, 3. SSE fan-out to 1/10/100 readers, 4. catch-up MB/s with 20/50 clients,
5. server memory with N streams and with 100 SSE readers. Every target gets fresh servers on
127.0.0.1 ports, each workload runs on all targets in turn, and every process started is
stopped by pid at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streambench.model import BenchConfig, WorkloadResult
from streambench.processes import ProcessSupervisor
from streambench.report import TargetReport, render
from streambench.runner import (
    TargetRun,
    cli_overrides,
    command_output,
    environment,
    run_workload,
    write_results,
)
from streambench.servers import (
    BENCH_DIR,
    NODE_PACKAGES,
    TARGETS,
    RunningServer,
    ServerStartError,
    ensure_node_packages,
    node_executable,
    start_server,
    stop_server,
)
from streambench.workloads import append, catchup, fanout, longpoll, memory

Workload = Callable[[RunningServer, BenchConfig], Awaitable[WorkloadResult]]

# Run in this order on one server per target; "memory" gets fresh servers of its own so
# its idle figure is not inflated by the other workloads' data.
SHARED_SERVER_WORKLOADS: dict[str, Workload] = {
    "append": append.run,
    "longpoll": longpoll.run,
    "fanout": fanout.run,
    "catchup": catchup.run,
}
OWN_SERVER_WORKLOADS: dict[str, Workload] = {"memory": memory.run}
ALL_WORKLOADS = [*SHARED_SERVER_WORKLOADS, *OWN_SERVER_WORKLOADS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--targets",
        default="ours,ref-memory,ref-file",
        help=f"comma-separated, from: {', '.join(TARGETS)}",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated, from: {', '.join(ALL_WORKLOADS)}",
    )
    parser.add_argument("--duration", type=float, help="seconds per append run (default 10)")
    parser.add_argument(
        "--fanout-seconds", type=float, help="seconds the SSE fan-out writer runs (default 10)"
    )
    parser.add_argument(
        "--memory-streams", type=int, help="streams created for the memory figure (default 100000)"
    )
    parser.add_argument(
        "--long-poll-timeout-ms", type=int, help="server long-poll timeout (default 5000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shrink every workload for a smoke run (~1 minute)"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON results file (default bench/results/<timestamp>.json)"
    )
    args = parser.parse_args(argv)
    for option, known in (("targets", TARGETS), ("workloads", ALL_WORKLOADS)):
        chosen = [v.strip() for v in getattr(args, option).split(",") if v.strip()]
        unknown = [v for v in chosen if v not in known]
        if unknown or not chosen:
            parser.error(f"--{option}: unknown {unknown}, choose from {', '.join(known)}")
        setattr(args, option, chosen)
    return args


def build_config(args: argparse.Namespace) -> BenchConfig:
    overrides = cli_overrides(
        args,
        (
            ("duration", "duration_s"),
            ("fanout_seconds", "fanout_seconds"),
            ("memory_streams", "memory_streams"),
            ("long_poll_timeout_ms", "long_poll_timeout_ms"),
        ),
    )
    return BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)


async def run_phase(
    runs: list[TargetRun],
    workloads: dict[str, Workload],
    config: BenchConfig,
    supervisor: ProcessSupervisor,
) -> None:
    """Start a fresh server per target, then run each workload on every target in turn.

    Interleaving keeps the targets' figures for one workload minutes apart rather than a
    whole run apart, so a burst of other activity on the machine skews them less unevenly.
    """
    label = "-".join(workloads)
    servers: dict[str, RunningServer] = {}
    try:
        for run in runs:
            print(f"[{run.target}] starting server for {', '.join(workloads)}", flush=True)
            try:
                servers[run.target] = await start_server(
                    run.target, supervisor, config.long_poll_timeout_ms, label
                )
            except ServerStartError as exc:
                print(f"[{run.target}] server did not start: {exc}", file=sys.stderr, flush=True)
                for name in workloads:
                    run.report.errors[name] = f"server did not start: {exc}"
        for name, workload in workloads.items():
            for run in runs:
                server = servers.get(run.target)
                if server is not None:
                    await run_workload(run, name, workload, server, config, supervisor)
    finally:
        for run in runs:
            server = servers.pop(run.target, None)
            if server is None:
                continue
            failed = any(name in run.report.errors for name in workloads)
            code = stop_server(server, supervisor, keep_log=failed)
            kept = f", log kept at {server.log_path}" if failed else ""
            print(f"[{run.target}] server stopped (exit code {code}){kept}", flush=True)


def node_environment() -> dict[str, Any]:
    return {
        "node": command_output([node_executable(), "--version"]),
        "node_packages": {pkg: version for pkg, version in NODE_PACKAGES.values()},
    }


async def main_async(args: argparse.Namespace) -> int:
    config = build_config(args)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ensure_node_packages()
    started_at = datetime.now(UTC)
    supervisor = ProcessSupervisor()
    runs = [TargetRun(TargetReport(target)) for target in args.targets]
    try:
        for group in (SHARED_SERVER_WORKLOADS, OWN_SERVER_WORKLOADS):
            chosen = {name: w for name, w in group.items() if name in args.workloads}
            if chosen:
                await run_phase(runs, chosen, config, supervisor)
    finally:
        supervisor.stop_all()
    reports = [run.report for run in runs]
    table = render(reports)
    print()
    print(table)
    out = args.out or BENCH_DIR / "results" / f"{started_at:%Y%m%d-%H%M%S}.json"
    write_results(
        out,
        started_at=started_at,
        config=config.as_dict(),
        environment=environment(**node_environment()),
        runs=runs,
        descriptions=TARGETS,
        table=table,
    )
    print(f"results written to {out}")
    return 1 if any(r.errors for r in reports) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every started process has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

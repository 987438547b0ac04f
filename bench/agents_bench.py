"""Agents benchmark: our `electric-agents serve` on a fresh data dir and embedded Postgres.

    .venv/bin/python bench/agents_bench.py [--entities 100000] [--duration 10] [--quick]
        [--ticks 30] [--scenarios spawn,send,webhook,cycle,parent-wake,cron,memory]
        [--out bench/results/agents-<name>.json]

Scenarios (see docs/benchmarks.md): 1. spawns/s and 2. sends/s at concurrency 1 and 16,
3. send -> webhook arrival latency, 4. send -> claim -> write -> done cycle latency (a
handler in this process on 127.0.0.1), 5. a child's completed run -> the runFinished wake
in its parent's stream, 6. cron tick jitter of an every-second schedule, 7. server RSS
growth with N idle entities (on a second fresh server). There is no reference agents server
to compare against here (it needs Electric, a Durable Streams server and Postgres), so the
table has one column.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from agentsbench import coordination, dispatch, memory, throughput
from agentsbench.config import AgentsBenchConfig
from streambench.model import WorkloadResult
from streambench.processes import ProcessSupervisor
from streambench.report import TargetReport, render
from streambench.runner import TargetRun, cli_overrides, environment, run_workload, write_results
from streambench.servers import (
    BENCH_DIR,
    RunningServer,
    ServerStartError,
    start_server,
    stop_server,
)

Scenario = Callable[[RunningServer, AgentsBenchConfig], Awaitable[WorkloadResult]]
TARGET = "ours"
DESCRIPTION = {TARGET: "electric-agents serve (Python + embedded Postgres)"}

# Scenarios 1-6 share one server; "memory" gets a fresh one so its baseline is clean.
SHARED_SERVER_SCENARIOS: dict[str, Scenario] = {
    "spawn": throughput.spawn_rate,
    "send": throughput.send_rate,
    "webhook": dispatch.webhook_arrival,
    "cycle": dispatch.full_cycle,
    "parent-wake": coordination.parent_wake,
    "cron": coordination.cron_jitter,
}
OWN_SERVER_SCENARIOS: dict[str, Scenario] = {"memory": memory.idle_entities}
ALL_SCENARIOS = [*SHARED_SERVER_SCENARIOS, *OWN_SERVER_SCENARIOS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated, from: {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument("--entities", type=int, help="idle entities for the memory figure (100000)")
    parser.add_argument("--duration", type=float, help="seconds per spawn/send run (default 10)")
    parser.add_argument(
        "--iterations", type=int, help="measured sends per latency scenario (default 300)"
    )
    parser.add_argument(
        "--ticks", type=int, help="measured ticks of the every-second cron schedule (default 30)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shrink every scenario for a smoke run"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON results (default bench/results/agents-<timestamp>.json)"
    )
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.scenarios.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in ALL_SCENARIOS]
    if unknown or not chosen:
        parser.error(f"--scenarios: unknown {unknown}, choose from {', '.join(ALL_SCENARIOS)}")
    args.scenarios = chosen
    for name in ("entities", "ticks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def build_config(args: argparse.Namespace) -> AgentsBenchConfig:
    overrides = cli_overrides(
        args,
        (
            ("entities", "entities"),
            ("duration", "duration_s"),
            ("iterations", "latency_iterations"),
            ("ticks", "cron_ticks"),
        ),
    )
    return AgentsBenchConfig.quick(**overrides) if args.quick else AgentsBenchConfig(**overrides)


async def run_on_fresh_server(
    run: TargetRun,
    scenarios: dict[str, Scenario],
    config: AgentsBenchConfig,
    supervisor: ProcessSupervisor,
) -> None:
    label = "-".join(scenarios)
    print(f"[{TARGET}] starting `electric-agents serve` for {', '.join(scenarios)}", flush=True)
    try:
        server = await start_server(
            TARGET, supervisor, config.long_poll_timeout_ms, label, ours_command="serve"
        )
    except ServerStartError as exc:
        print(f"[{TARGET}] server did not start: {exc}", file=sys.stderr, flush=True)
        for name in scenarios:
            run.report.errors[name] = f"server did not start: {exc}"
        return
    try:
        for name, scenario in scenarios.items():
            await run_workload(run, name, scenario, server, config, supervisor)
    finally:
        failed = any(name in run.report.errors for name in scenarios)
        code = stop_server(server, supervisor, keep_log=failed)
        kept = f", log kept at {server.log_path}" if failed else ""
        print(f"[{TARGET}] server stopped (exit code {code}){kept}", flush=True)


async def main_async(args: argparse.Namespace) -> int:
    config = build_config(args)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    started_at = datetime.now(UTC)
    supervisor = ProcessSupervisor()
    run = TargetRun(TargetReport(TARGET))
    try:
        for group in (SHARED_SERVER_SCENARIOS, OWN_SERVER_SCENARIOS):
            chosen = {name: s for name, s in group.items() if name in args.scenarios}
            if chosen:
                await run_on_fresh_server(run, chosen, config, supervisor)
    finally:
        supervisor.stop_all()
    table = render([run.report])
    print()
    print(table)
    out = args.out or BENCH_DIR / "results" / f"agents-{started_at:%Y%m%d-%H%M%S}.json"
    write_results(
        out,
        started_at=started_at,
        config=config.as_dict(),
        environment=environment(),
        runs=[run],
        descriptions=DESCRIPTION,
        table=table,
    )
    print(f"results written to {out}")
    return 1 if run.report.errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every started process has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

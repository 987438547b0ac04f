"""What every benchmark script shares: running one workload so a failure is reported rather
than fatal, the environment block, and the JSON results document."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from streambench.model import WorkloadResult
from streambench.processes import ProcessSupervisor
from streambench.report import TargetReport
from streambench.servers import BENCH_DIR, RunningServer, log_tail

Config = TypeVar("Config")
EXIT_GRACE_S = 1.0  # after a failed workload, how long to wait for a dying server's exit


@dataclass
class TargetRun:
    report: TargetReport
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.report.target


async def run_workload(
    run: TargetRun,
    name: str,
    workload: Callable[[RunningServer, Config], Awaitable[WorkloadResult]],
    server: RunningServer,
    config: Config,
    supervisor: ProcessSupervisor,
) -> None:
    if supervisor.exit_code(server.pid) is not None:
        run.report.errors[name] = f"server had exited: {log_tail(server)}"
        return
    started = time.perf_counter()
    print(f"[{run.target}] {name} ...", flush=True)
    try:
        result = await workload(server, config)
    except Exception as exc:  # one broken workload must not lose the others' figures
        message = f"{type(exc).__name__}: {exc}"
        print(f"[{run.target}] {name} FAILED: {message}", file=sys.stderr, flush=True)
        exit_code = supervisor.exit_code_within(server.pid, EXIT_GRACE_S)
        if exit_code is not None:
            message += f" (server exited {exit_code}: {log_tail(server)})"
        run.report.errors[name] = message
        return
    run.report.metrics.extend(result.metrics)
    run.raw[name] = result.raw
    print(f"[{run.target}] {name} done in {time.perf_counter() - started:.1f}s", flush=True)


def cli_overrides(args: Any, flags_to_fields: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The config fields given on the command line (`args.<flag>` -> `<field>`); flags left
    unset keep the config's defaults."""
    return {
        field_name: getattr(args, flag)
        for flag, field_name in flags_to_fields
        if getattr(args, flag) is not None
    }


def command_output(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    return None


def environment(**extra: Any) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "git_commit": command_output(["git", "-C", str(BENCH_DIR), "rev-parse", "HEAD"]),
        **extra,
    }


def write_results(
    out: Path,
    *,
    started_at: datetime,
    config: dict[str, Any],
    environment: dict[str, Any],
    runs: Sequence[TargetRun],
    descriptions: dict[str, str],
    table: str,
) -> None:
    """The JSON document: configuration, environment, every figure and the raw detail."""
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "argv": sys.argv[1:],
        "config": config,
        "environment": environment,
        "targets": {
            run.target: {
                "description": descriptions[run.target],
                "metrics": [m.as_dict() for m in run.report.metrics],
                "errors": run.report.errors,
                "raw": run.raw,
            }
            for run in runs
        },
        "report_markdown": table,
    }
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")

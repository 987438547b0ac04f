"""Every process the bench starts, and what it measures about the servers (CPU, memory).

All processes are stopped by pid: SIGTERM, a grace period, then SIGKILL. Nothing is ever
stopped by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


class ProcessSupervisor:
    """Owns the processes the bench started; `stop_all` ends whatever is still running."""

    def __init__(self) -> None:
        self._popen: dict[int, subprocess.Popen[bytes]] = {}
        # Processes we caused to exist without spawning them directly (the embedded
        # Postgres of our server); stopped only if they outlive their parent.
        self._orphan_candidates: dict[int, signal.Signals] = {}

    def spawn(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> int:
        log_file = log_path.open("ab")
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in the terminal reaches only the bench
            )
        finally:
            log_file.close()
        self._popen[proc.pid] = proc
        return proc.pid

    def watch_orphan(self, pid: int, stop_signal: signal.Signals) -> None:
        self._orphan_candidates[pid] = stop_signal

    def exit_code(self, pid: int) -> int | None:
        proc = self._popen.get(pid)
        return None if proc is None else proc.poll()

    def exit_code_within(self, pid: int, timeout_s: float) -> int | None:
        """The exit code if the process ends within `timeout_s` (blocking): a request can
        fail a moment before a dying server has been reaped."""
        proc = self._popen.get(pid)
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, pid: int, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns the exit code."""
        proc = self._popen.pop(pid, None)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def stop_orphan(self, pid: int, grace_s: float = 15.0) -> None:
        stop_signal = self._orphan_candidates.pop(pid, None)
        if stop_signal is None or not psutil.pid_exists(pid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, stop_signal)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for pid in list(self._popen):
            self.stop(pid, grace_s=10.0)
        for pid in list(self._orphan_candidates):
            self.stop_orphan(pid)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# pid -> (create_time, user + system CPU seconds) of every process that is not ours.
OtherProcesses = dict[int, tuple[float, float]]
KERNEL_THREADS_PARENT = 2  # kthreadd; its children do I/O on behalf of whoever asked


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.perf_counter()
    server_s: float
    postgres_s: float | None
    others: OtherProcesses


@dataclass(frozen=True)
class CpuUsage:
    wall_s: float
    server_s: float
    postgres_s: float | None
    other_s: float  # user-space processes that are neither the bench nor what it started

    @property
    def server_cores(self) -> float:
        return self.server_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def postgres_cores(self) -> float | None:
        if self.postgres_s is None or self.wall_s <= 0:
            return None
        return self.postgres_s / self.wall_s

    @property
    def other_cores(self) -> float:
        """CPU taken by other jobs on the machine: well above 0.1 makes a run noisy."""
        return self.other_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | None]:
        return {
            "wall_s": self.wall_s,
            "server_cpu_s": self.server_s,
            "postgres_cpu_s": self.postgres_s,
            "other_processes_cpu_s": self.other_s,
            "server_cores": self.server_cores,
            "postgres_cores": self.postgres_cores,
            "other_cores": self.other_cores,
        }


@dataclass(frozen=True)
class MemorySample:
    server_rss: int
    postgres_pss: int | None  # summed over the postmaster and its backends


class ResourceProbe:
    """CPU time and memory of one server process and, for our server, its Postgres.

    Server figures are the server process alone (no children). Postgres CPU is the
    postmaster plus its live backends plus the reaped ones (children_* times); its memory is
    summed PSS, so shared buffers are counted once rather than once per backend.
    """

    def __init__(self, server_pid: int, postgres_pid: int | None) -> None:
        self.server = psutil.Process(server_pid)
        self.postgres = psutil.Process(postgres_pid) if postgres_pid else None
        self.bench = psutil.Process()

    def cpu(self) -> CpuSample:
        times = self.server.cpu_times()
        return CpuSample(
            at=time.perf_counter(),
            server_s=times.user + times.system,
            postgres_s=self._postgres_cpu(),
            others=self._other_processes(),
        )

    @staticmethod
    def usage(start: CpuSample, end: CpuSample) -> CpuUsage:
        postgres = None
        if start.postgres_s is not None and end.postgres_s is not None:
            postgres = end.postgres_s - start.postgres_s
        other = 0.0
        for pid, (created, cpu_s) in end.others.items():
            before = start.others.get(pid)
            other += cpu_s - before[1] if before and before[0] == created else cpu_s
        return CpuUsage(end.at - start.at, end.server_s - start.server_s, postgres, other)

    def _other_processes(self) -> OtherProcesses:
        """Every user-space process except the bench, what it started, and our Postgres."""
        mine = {self.bench.pid, *(p.pid for p in self.bench.children(recursive=True))}
        if self.postgres is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                mine |= {self.postgres.pid, *(p.pid for p in self.postgres.children(True))}
        others: OtherProcesses = {}
        for proc in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
            info = proc.info
            times = info["cpu_times"]
            if (
                info["pid"] in mine
                or times is None
                or KERNEL_THREADS_PARENT in (info["pid"], info["ppid"])
            ):
                continue
            others[info["pid"]] = (info["create_time"], times.user + times.system)
        return others

    def memory(self) -> MemorySample:
        return MemorySample(self.server.memory_info().rss, self._postgres_pss())

    def _postgres_cpu(self) -> float | None:
        if self.postgres is None:
            return None
        try:
            times = self.postgres.cpu_times()
            total = times.user + times.system + times.children_user + times.children_system
            children = self.postgres.children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
        return total

    def _postgres_pss(self) -> int | None:
        if self.postgres is None:
            return None
        try:
            procs = [self.postgres, *self.postgres.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += proc.memory_full_info().pss
        return total

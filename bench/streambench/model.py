"""Benchmark settings and the shape of a measured figure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from streambench.processes import CpuUsage

Better = Literal["higher", "lower", "info"]


@dataclass(frozen=True)
class BenchConfig:
    # 1. append throughput
    duration_s: float = 10.0
    warmup_s: float = 1.0
    append_connections: tuple[int, ...] = (1, 8, 32)
    append_body_bytes: int = 256
    # 2. append -> long-poll delivery
    longpoll_iterations: int = 300
    # 3. SSE fan-out
    fanout_readers: tuple[int, ...] = (1, 10, 100)
    fanout_seconds: float = 10.0
    fanout_rate_per_s: float = 50.0
    fanout_payload_bytes: int = 256
    # 4. catch-up
    catchup_messages: int = 2000
    catchup_message_bytes: int = 1024
    catchup_clients: tuple[int, ...] = (20, 50)
    # One round of 20 clients is a burst of about 50 ms: too short for a stable rate or any
    # CPU figure (the kernel counts CPU in 10 ms ticks), so each count runs several rounds.
    catchup_rounds: int = 10
    # 5. memory
    memory_streams: int = 100_000
    memory_sse_readers: int = 100
    memory_sse_seconds: float = 5.0
    # Servers
    long_poll_timeout_ms: int = 5000

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """About a minute for all three targets: every workload runs, each one shrunk."""
        settings: dict[str, Any] = {
            "duration_s": 1.0,
            "warmup_s": 0.2,
            "longpoll_iterations": 50,
            "fanout_seconds": 1.5,
            "catchup_messages": 500,
            "catchup_rounds": 2,
            "memory_streams": 2000,
            "memory_sse_seconds": 1.0,
        }
        settings.update(overrides)
        return cls(**settings)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Metric:
    """One figure in the report: a row is (section, name), a column is a target."""

    section: str
    name: str
    unit: str
    value: float | None
    better: Better = "info"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkloadResult:
    metrics: list[Metric] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(
        self, section: str, name: str, unit: str, value: float | None, better: Better = "info"
    ) -> None:
        self.metrics.append(Metric(section, name, unit, value, better))

    def add_cpu(self, section: str, label: str, cpu: CpuUsage) -> None:
        """Server CPU (and our Postgres's, when there is one) in cores over a measured window."""
        self.add(section, f"{label}: server CPU", "cores", cpu.server_cores)
        if cpu.postgres_cores is not None:
            self.add(section, f"{label}: Postgres CPU", "cores", cpu.postgres_cores)

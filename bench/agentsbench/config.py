"""Agents benchmark settings: every scenario is bounded by a duration or a count."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class AgentsBenchConfig:
    # spawn and send throughput
    concurrencies: tuple[int, ...] = (1, 16)
    duration_s: float = 10.0
    warmup_s: float = 1.0
    # send -> webhook arrival, and the full send -> claim -> write -> done cycle
    latency_iterations: int = 300
    latency_entities: int = 8
    latency_deadline_s: float = 60.0
    # cron tick jitter: ticks of an every-second schedule (after one unmeasured tick)
    cron_ticks: int = 30
    # server RSS with N idle entities, on a fresh server
    entities: int = 100_000
    memory_concurrency: int = 16
    memory_deadline_s: float = 420.0
    # Servers
    long_poll_timeout_ms: int = 5000

    @classmethod
    def quick(cls, **overrides: Any) -> AgentsBenchConfig:
        """A smoke run of every scenario, each one shrunk (under a minute, mostly the two
        server starts and the cron ticks)."""
        settings: dict[str, Any] = {
            "duration_s": 1.0,
            "warmup_s": 0.2,
            "latency_iterations": 20,
            "latency_entities": 2,
            "latency_deadline_s": 20.0,
            "entities": 300,
            "cron_ticks": 3,
        }
        settings.update(overrides)
        return cls(**settings)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

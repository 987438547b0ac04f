"""Latency summaries (nearest-rank percentiles, in milliseconds)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict


class LatencySummary(TypedDict):
    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (the same rule as the Node loader)."""
    if not sorted_values:
        return None
    rank = math.ceil(pct / 100 * len(sorted_values)) - 1
    return sorted_values[min(len(sorted_values) - 1, max(0, rank))]


def summarize_ms(values_ms: Sequence[float]) -> LatencySummary:
    ordered = sorted(values_ms)
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1] if ordered else None,
        "mean": sum(ordered) / len(ordered) if ordered else None,
    }

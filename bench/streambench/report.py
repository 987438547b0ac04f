"""Side-by-side report: one Markdown table per workload, one column per target, plus ratios.

Ratio columns are `ours / <reference>` for each reference target when ours ran, otherwise
every other target over the first one. A ratio above 1 is good for a "higher" (↑) metric and
bad for a "lower" (↓) one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from streambench.model import Better, Metric

ARROWS: dict[Better, str] = {"higher": " ↑", "lower": " ↓", "info": ""}


@dataclass
class TargetReport:
    target: str
    metrics: list[Metric] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # workload -> error message


def ratio_pairs(targets: Sequence[str]) -> list[tuple[str, str]]:
    """(numerator, denominator) pairs for the ratio columns."""
    if "ours" in targets:
        return [("ours", t) for t in targets if t != "ours"]
    return [(t, targets[0]) for t in targets[1:]]


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100 or magnitude == int(magnitude):  # counts print as integers
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def render(reports: Sequence[TargetReport]) -> str:
    targets = [r.target for r in reports]
    pairs = ratio_pairs(targets)
    rows: dict[tuple[str, str], Metric] = {}
    values: dict[tuple[str, str], dict[str, float | None]] = {}
    for report in reports:
        for metric in report.metrics:
            key = (metric.section, metric.name)
            rows.setdefault(key, metric)
            values.setdefault(key, {})[report.target] = metric.value

    header = ["metric", "unit", *targets, *(f"{a}/{b}" for a, b in pairs)]
    sections: dict[str, list[list[str]]] = {}
    for key, metric in rows.items():
        row_values = values[key]
        sections.setdefault(metric.section, []).append(
            [
                metric.name,
                metric.unit + ARROWS[metric.better],
                *(format_value(row_values.get(t)) for t in targets),
                *(format_ratio(row_values.get(a), row_values.get(b)) for a, b in pairs),
            ]
        )

    parts: list[str] = []
    for section, table_rows in sections.items():
        parts.append(f"### {section}\n")
        parts.append(_markdown_table(header, table_rows))
        parts.append("")
    for report in reports:
        for workload, message in report.errors.items():
            first_line = message.strip().splitlines()[0] if message.strip() else "error"
            parts.append(f"- {report.target}: {workload} FAILED: {first_line}")
    return "\n".join(parts).rstrip() + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    separator = (
        "|"
        + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), separator, *(line(r) for r in rows)])

"""Smoke run of bench/agents_bench.py with tiny counts, so the benchmark cannot rot: it
starts its own `electric-agents serve` (fresh data dir, embedded Postgres), runs every
scenario against a webhook handler in the bench process, and writes its JSON and table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "agents_bench.py"
SCENARIOS = ("spawn", "send", "webhook", "cycle", "memory")


def figures(document: dict[str, object]) -> dict[str, float | None]:
    target = document["targets"]["ours"]  # type: ignore[index]
    return {f"{m['section']} / {m['name']}": m["value"] for m in target["metrics"]}


def figure(values: dict[str, float | None], section_prefix: str, name: str) -> float:
    matches = [v for k, v in values.items() if k.startswith(section_prefix) and k.endswith(name)]
    assert len(matches) == 1, (section_prefix, name, sorted(values))
    assert matches[0] is not None
    return matches[0]


@pytest.mark.timeout(90)
def test_quick_bench_run_measures_every_scenario_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "agents-smoke.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--entities", "150", "--iterations", "10",
         "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=80,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["targets"]["ours"]["errors"] == {}
    assert set(document["targets"]["ours"]["raw"]) == set(SCENARIOS)
    assert document["config"]["entities"] == 150
    values = figures(document)

    for concurrency in (1, 16):
        assert figure(values, "1. spawn", f"concurrency {concurrency}: spawns/s") > 0
        assert figure(values, "2. send", f"concurrency {concurrency}: sends/s") > 0
        assert figure(values, "1. spawn", f"concurrency {concurrency}: errors") == 0
        assert figure(values, "2. send", f"concurrency {concurrency}: errors") == 0
    assert figure(values, "3. send -> webhook", "measured sends") == 10
    assert figure(values, "3. send -> webhook", "missed wakes") == 0
    assert 0 < figure(values, "3. send -> webhook", "arrival p50") < 1000
    assert figure(values, "4. send -> claim", "measured cycles") == 10
    assert figure(values, "4. send -> claim", "failed cycles") == 0
    assert figure(values, "4. send -> claim", "entities idle at the end (of 2)") == 2
    # The full cycle contains the wake's arrival, so it cannot be the shorter of the two.
    assert figure(values, "4. send -> claim", "done acknowledged p50") > figure(
        values, "4. send -> claim", "send -> wake arrival p50"
    )
    assert figure(values, "5. memory", "entities spawned (of 150)") == 150
    assert figure(values, "5. memory", "after 150 entities: server RSS") > 0
    # The printed table is the one stored in the document.
    assert document["report_markdown"] in completed.stdout

"""bench/agents_bench.py, run as a user runs it: a smoke run with tiny counts so the
benchmark cannot rot (it starts its own `electric-agents serve` on a fresh data dir with an
embedded Postgres, runs every scenario against a webhook handler in the bench process, and
writes its JSON and table), an interrupted run that must leave no process or data behind,
and arguments it must refuse."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "agents_bench.py"
SCENARIOS = ("spawn", "send", "webhook", "cycle", "parent-wake", "cron", "memory")


def figures(document: dict[str, object]) -> dict[str, float | None]:
    target = document["targets"]["ours"]  # type: ignore[index]
    return {f"{m['section']} / {m['name']}": m["value"] for m in target["metrics"]}


def figure(values: dict[str, float | None], section_prefix: str, name: str) -> float:
    matches = [v for k, v in values.items() if k.startswith(section_prefix) and k.endswith(name)]
    assert len(matches) == 1, (section_prefix, name, sorted(values))
    assert matches[0] is not None
    return matches[0]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_bench_run_measures_every_scenario_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "agents-smoke.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--duration", "0.5", "--entities", "150",
         "--iterations", "10", "--ticks", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=110,
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
    # Spawning links at the stream's tail and each wake is delivered once: no stray wakes.
    raw = document["targets"]["ours"]["raw"]
    assert raw["webhook"]["unexpected_wakes"] == 0
    assert raw["cycle"]["unexpected_wakes"] == 0
    assert raw["cycle"]["failures"] == []
    # A child's run -> its parent's runFinished wake, read live from the parent's stream.
    assert figure(values, "5. child run", "measured children") == 10
    assert figure(values, "5. child run", "failed rounds") == 0
    assert figure(values, "5. child run", "wakes without the child's response") == 0
    assert figure(values, "5. child run", "duplicate wakes") == 0
    assert 0 < figure(values, "5. child run", "parent wake p50") < 1000
    assert raw["parent-wake"]["children"] == 10 + 2  # a warm-up child per parent
    assert raw["parent-wake"]["unexpected_wakes"] == 0
    # Cron ticks every second, each within its second and read live.
    assert figure(values, "6. cron", "measured ticks (of 3)") == 3
    assert figure(values, "6. cron", "skipped seconds") == 0
    assert figure(values, "6. cron", "doubled ticks") == 0
    fired_max = figure(values, "6. cron", "firedAt - second boundary max")
    arrival_max = figure(values, "6. cron", "arrival at the reader - second boundary max")
    assert 0 <= fired_max < 1000
    # A tick reaches the reader after it was stamped (same clock: both on this host).
    assert arrival_max >= fired_max
    assert raw["cron"]["schedule_delete_error"] is None
    assert figure(values, "7. memory", "entities spawned (of 150)") == 150
    assert figure(values, "7. memory", "after 150 entities: server RSS") > 0
    # The printed table is the one stored in the document.
    assert document["report_markdown"] in completed.stdout


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class RunningBench:
    process: subprocess.Popen[str]
    server_pid: int
    postmaster_pid: int
    data_dir: Path


@contextlib.contextmanager
def bench_in_its_first_scenario(out: Path) -> Iterator[RunningBench]:
    """The bench started on spawn and send (30 s each), once its spawn scenario is running;
    killed at the end if the test has not made it exit."""
    process = subprocess.Popen(
        [sys.executable, str(BENCH), "--scenarios", "spawn,send", "--duration", "30",
         "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:  # bounded by the test timeout
            seen.append(line)
            if line.startswith("[ours] spawn ..."):
                break
        assert seen and seen[-1].startswith("[ours] spawn ..."), "".join(seen)
        servers = [
            p for p in psutil.Process(process.pid).children(recursive=True)
            if "serve" in p.cmdline()
        ]  # fmt: skip
        assert len(servers) == 1, servers
        argv = servers[0].cmdline()
        data_dir = Path(argv[argv.index("--data-dir") + 1])
        postmaster = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        assert _alive(servers[0].pid) and _alive(postmaster)
        yield RunningBench(process, servers[0].pid, postmaster, data_dir)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_mid_run_stops_the_server_and_its_postgres_and_removes_the_data_dir(
    tmp_path: Path,
) -> None:
    with bench_in_its_first_scenario(tmp_path / "interrupted.json") as bench:
        bench.process.send_signal(signal.SIGTERM)
        rest = bench.process.communicate(timeout=60)[0]
    assert bench.process.returncode == 130, rest
    assert "every started process has been stopped" in rest
    assert not _alive(bench.server_pid)
    assert not _alive(bench.postmaster_pid)
    assert not bench.data_dir.exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_server_killed_mid_run_is_reported_its_postgres_stopped_and_its_log_kept(
    tmp_path: Path,
) -> None:
    out = tmp_path / "server-died.json"
    with bench_in_its_first_scenario(out) as bench:
        os.kill(bench.server_pid, signal.SIGKILL)
        rest = bench.process.communicate(timeout=60)[0]
    assert bench.process.returncode == 1, rest
    errors = json.loads(out.read_text())["targets"]["ours"]["errors"]
    assert set(errors) == {"spawn", "send"}, errors
    assert "(server exited -9" in errors["spawn"]
    # Usually "server had exited"; a request may fail just before the dying server is reaped.
    assert "exited" in errors["send"], errors
    assert "send FAILED" in rest
    # Our server died without stopping its Postgres; the bench stops it by pid.
    assert not _alive(bench.postmaster_pid)
    assert not bench.data_dir.exists()
    kept = [line for line in rest.splitlines() if "log kept at" in line]
    assert len(kept) == 1, rest
    log = Path(kept[0].rsplit("log kept at ", 1)[1])
    assert log.exists()
    log.unlink()


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--scenarios", "spawn,nonsense"], "--scenarios: unknown ['nonsense']"),
        (["--scenarios", ","], "--scenarios: unknown []"),
        (["--entities", "0"], "--entities must be at least 1"),
        (["--ticks", "-2"], "--ticks must be at least 1"),
        (["--duration", "soon"], "invalid float value"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(argv: list[str], complaint: str) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=30
    )
    assert completed.returncode == 2
    assert complaint in completed.stderr

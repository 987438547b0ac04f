"""Run the published Durable Streams conformance suite against our server.

Each test starts `electric-agents` as a subprocess on a free 127.0.0.1 port with a fresh
database (the shared fixtures in conftest.py), runs the vitest project in `conformance/`
against it, and checks the exact counts from vitest's JSON report (spec/01 Part C):

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
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ServerFactory, log_tail

pytestmark = pytest.mark.conformance

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_BIN = CONFORMANCE_DIR / "node_modules" / ".bin" / "vitest"
SUITE_PACKAGE = CONFORMANCE_DIR / "node_modules" / "@durable-streams" / "server-conformance-tests"

LONG_POLL_TIMEOUT_MS = 500
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
        pytest.fail(f"vitest wrote no JSON report:\n{log_tail(log_path)}")
    return read_report(report_path)


# --- the tests --------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES)
def test_conformance_suite(
    case: Case,
    conformance_suite: Path,
    server_factory: ServerFactory,
    tmp_path: Path,
) -> None:
    # A fresh database; any default data dir lands in the test's tmp dir (the server's cwd).
    server = server_factory(case.command, long_poll_timeout_ms=LONG_POLL_TIMEOUT_MS)
    result = run_suite(conformance_suite, server.origin, case.subscriptions, tmp_path)
    server.stop()

    summary = (
        f"{case.command}: {result.passed} passed, {len(result.failed)} failed, "
        f"{result.skipped} skipped of {result.total}"
    )
    print(summary)
    failures = "\n".join(f"  FAILED {name}" for name in result.failed)
    if result.failed:
        pytest.fail(f"{summary}\n{failures}")
    assert result.total == TOTAL_TESTS, summary
    assert result.passed == case.expected_passed, summary
    assert result.skipped == case.expected_skipped, summary

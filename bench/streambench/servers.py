"""The servers under test: our Python server and the pinned Node reference (two storage modes).

Each `start_server` gives a fresh server on a free loopback port with a fresh data dir, and
waits until it answers HTTP. Streams live at `<base>/v1/stream/<name>` on all targets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from streambench.processes import ProcessSupervisor, ResourceProbe

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
REFERENCE_DIR = BENCH_DIR / "reference"
LOAD_DIR = BENCH_DIR / "load"

TARGETS: dict[str, str] = {
    "ours": "electric-agents streams (Python + embedded Postgres)",
    "ref-memory": "@durable-streams/server 0.3.7, in-memory store",
    "ref-file": "@durable-streams/server 0.3.7, file-backed store (LMDB + logs)",
}

# Node packages the bench installs itself (`npm ci` from the committed lock files).
NODE_PACKAGES: dict[Path, tuple[str, str]] = {
    REFERENCE_DIR: ("@durable-streams/server", "0.3.7"),
    LOAD_DIR: ("undici", "7.30.2"),
}

STARTUP_TIMEOUT_S = {"ours": 180.0, "ref-memory": 30.0, "ref-file": 30.0}


class ServerStartError(RuntimeError):
    pass


@dataclass
class RunningServer:
    target: str
    base_url: str
    pid: int
    postgres_pid: int | None
    data_dir: Path
    log_path: Path

    def stream_url(self, name: str) -> str:
        return f"{self.base_url}/v1/stream/{name}"

    def probe(self) -> ResourceProbe:
        return ResourceProbe(self.pid, self.postgres_pid)


def ensure_node_packages() -> None:
    """Install the pinned Node packages (reference server, load generator) if missing."""
    npm = shutil.which("npm")
    for folder, (package, version) in NODE_PACKAGES.items():
        manifest = folder / "node_modules" / package / "package.json"
        if manifest.exists() and json.loads(manifest.read_text())["version"] == version:
            continue
        if npm is None:
            raise ServerStartError("npm is needed to install the reference server")
        print(f"installing {package}@{version} into {folder.relative_to(REPO_DIR)} ...")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=folder,
            check=True,
            timeout=600,
        )


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        raise ServerStartError("node is not on PATH")
    return node


def ours_executable() -> str:
    candidates = [
        Path(sys.executable).parent / "electric-agents",
        REPO_DIR / ".venv" / "bin" / "electric-agents",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("electric-agents")
    if found is None:
        raise ServerStartError("electric-agents is not installed (expected .venv/bin)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_argv(
    target: str, port: int, data_dir: Path, long_poll_timeout_ms: int, ours_command: str = "streams"
) -> list[str]:
    if target == "ours":
        return [
            ours_executable(), ours_command,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--data-dir", str(data_dir),
            "--long-poll-timeout-ms", str(long_poll_timeout_ms),
        ]  # fmt: skip
    argv = [
        node_executable(), str(REFERENCE_DIR / "serve.mjs"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--long-poll-timeout-ms", str(long_poll_timeout_ms),
    ]  # fmt: skip
    if target == "ref-file":
        argv += ["--data-dir", str(data_dir)]
    return argv


async def start_server(
    target: str,
    supervisor: ProcessSupervisor,
    long_poll_timeout_ms: int,
    label: str,
    *,
    ours_command: str = "streams",
) -> RunningServer:
    """`ours_command` picks the `electric-agents` subcommand: `streams` (Durable Streams
    only, under /v1/stream) or `serve` (the agents server, streams at the root)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    data_dir = Path(tempfile.mkdtemp(prefix=f"{ours_command}-bench-{target}-{label}-"))
    # The embedded Postgres drops to its own system user when run as root: let it traverse.
    data_dir.chmod(0o755)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    port = free_port()
    argv = server_argv(target, port, data_dir, long_poll_timeout_ms, ours_command)
    pid = supervisor.spawn(argv, log_path, cwd=data_dir)
    base_url = f"http://127.0.0.1:{port}"
    server = RunningServer(target, base_url, pid, None, data_dir, log_path)
    try:
        await _wait_ready(server, supervisor, STARTUP_TIMEOUT_S[target])
    except BaseException:
        stop_server(server, supervisor, keep_log=True)
        raise
    if target == "ours":
        server.postgres_pid = _postmaster_pid(data_dir / "pg")
        if server.postgres_pid is not None:
            # Only used if our server dies without stopping its Postgres (fast shutdown).
            supervisor.watch_orphan(server.postgres_pid, signal.SIGINT)
    return server


def stop_server(
    server: RunningServer, supervisor: ProcessSupervisor, keep_log: bool = False
) -> int | None:
    """Stop the server (and a Postgres it left behind), remove its data and, unless asked
    to keep it for a failure report, its log."""
    code = supervisor.stop(server.pid, grace_s=30.0 if server.target == "ours" else 10.0)
    if server.postgres_pid is not None:
        supervisor.stop_orphan(server.postgres_pid)
    shutil.rmtree(server.data_dir, ignore_errors=True)
    if not keep_log:
        server.log_path.unlink(missing_ok=True)
    return code


def log_tail(server: RunningServer, lines: int = 20) -> str:
    try:
        return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _wait_ready(
    server: RunningServer, supervisor: ProcessSupervisor, timeout_s: float
) -> None:
    # Ours has a health endpoint; the reference answers any path (404 is fine).
    if server.target == "ours":
        url, ok = f"{server.base_url}/_electric/health", {200}
    else:
        url, ok = server.stream_url("__bench_ready_probe"), {200, 404}
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            code = supervisor.exit_code(server.pid)
            if code is not None:
                raise ServerStartError(
                    f"{server.target} exited with code {code} during startup:\n{log_tail(server)}"
                )
            try:
                async with session.get(url) as resp:
                    if resp.status in ok:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise ServerStartError(f"{server.target} not ready after {timeout_s:.0f}s:\n{log_tail(server)}")


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first_line = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        return int(first_line.strip())
    except (OSError, IndexError, ValueError):
        return None

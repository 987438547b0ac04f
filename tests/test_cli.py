"""The `electric-agents` command: invalid settings, the embedded PostgreSQL, and where each
subcommand mounts the streams."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import (
    SERVER_SCRIPT,
    ServerFactory,
    ServerProcess,
    free_port,
    server_environment,
    unique_name,
)

TEXT = {"Content-Type": "text/plain"}
EXIT_TIMEOUT_S = 60


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SERVER_SCRIPT), *args],
        cwd=cwd,
        env=server_environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
    )


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("electric-agents: error: "), lines[0]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["streams", "--port", "abc"], {}, id="port-abc"),
        pytest.param(["serve", "--port", "70000"], {}, id="port-out-of-range"),
        pytest.param(["serve"], {"ELECTRIC_AGENTS_PORT": "99999"}, id="env-port-99999"),
        pytest.param(["serve"], {"PORT": "http"}, id="env-port-word"),
        pytest.param(["serve", "--database-url", "not a url"], {}, id="database-url-garbage"),
        pytest.param(
            ["serve", "--database-url", "mysql://localhost/x"], {}, id="database-url-mysql"
        ),
        pytest.param(["serve"], {"DATABASE_URL": "http://x"}, id="env-database-url-http"),
        pytest.param(["streams", "--long-poll-timeout-ms", "0"], {}, id="long-poll-zero"),
        pytest.param(["serve", "--max-append-bytes", "lots"], {}, id="max-append-word"),
        pytest.param(["serve", "--base-url", "ftp://x"], {}, id="base-url-ftp"),
        pytest.param([], {}, id="no-subcommand"),
        pytest.param(["frobnicate"], {}, id="unknown-subcommand"),
        pytest.param(["serve", "--no-such-flag"], {}, id="unknown-flag"),
    ],
)
def test_invalid_setting_exits_2_with_one_line_error(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    result = run_cli(args, tmp_path, env)
    assert_one_line_usage_error(result)
    # Nothing was started or created on the way out.
    assert not (tmp_path / ".electric-agents").exists()


@pytest.mark.timeout(90)
def test_port_in_use_exits_2_with_one_line_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_cli(
            ["streams", "--port", str(port), "--database-url", "postgresql://u@127.0.0.1:1/x"],
            tmp_path,
        )
    assert_one_line_usage_error(result)
    assert str(port) in result.stderr


@pytest.mark.timeout(90)
def test_unreachable_database_url_exits_2_with_one_line_error(tmp_path: Path) -> None:
    closed_port = free_port()  # nothing listens there
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/nowhere"
    result = run_cli(["serve", "--port", "0", "--database-url", url], tmp_path)
    assert_one_line_usage_error(result)


# --- the embedded PostgreSQL ---------------------------------------------------------------


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """Running processes whose command line mentions `data_dir` (the cluster's postgres)."""
    needle = str(data_dir.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if needle in cmdline and proc.pid != os.getpid():
            found.append(proc)
    return found


def wait_until_no_postgres(data_dir: Path, timeout_s: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := postgres_processes(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh data dir; a postmaster a failed test left running there is stopped by pid."""
    path = tmp_path / "data"
    yield path
    pid_file = path / "pg" / "postmaster.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().splitlines()[0])
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            proc.wait(10)


@pytest.mark.timeout(240)
def test_serve_without_database_url_runs_and_stops_its_embedded_postgres(
    server_factory: ServerFactory, data_dir: Path, client: httpx.Client
) -> None:
    server = server_factory("serve", database_url=None, data_dir=data_dir)
    assert (data_dir / "pg" / "PG_VERSION").is_file()
    assert postgres_processes(data_dir), "no postgres runs on the data dir"
    assert client.get(f"{server.origin}/_electric/health").status_code == 200
    name = unique_name("kept")
    assert client.put(server.url(name), content=b"written before", headers=TEXT).status_code == 201

    assert server.stop() == 0
    assert wait_until_no_postgres(data_dir) == []

    # The second start reuses the cluster: the stream is still there.
    server.start()
    assert client.get(server.url(name)).content == b"written before"
    assert client.post(server.url(name), content=b", and after", headers=TEXT).status_code == 204
    assert server.stop() == 0
    assert wait_until_no_postgres(data_dir) == []


# --- where the streams live ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_serve_mounts_streams_at_the_root(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    name = unique_name("root")
    url = f"{serve_server.origin}/{name}"
    created = client.put(url, content=b"at the root", headers=TEXT)
    assert created.status_code == 201
    assert created.headers["Location"] == url
    assert client.get(url).content == b"at the root"
    # /v1/stream/... is just another stream path here.
    nested = f"{serve_server.origin}/v1/stream/{name}"
    assert client.get(nested).status_code == 404
    assert client.put(nested, headers=TEXT).status_code == 201
    assert client.get(f"{serve_server.origin}/_electric/health").status_code == 200


@pytest.mark.timeout(90)
def test_streams_mounts_streams_at_v1_stream(
    streams_server: ServerProcess, client: httpx.Client
) -> None:
    name = unique_name("prefixed")
    url = f"{streams_server.origin}/v1/stream/{name}"
    created = client.put(url, content=b"under the prefix", headers=TEXT)
    assert created.status_code == 201
    assert created.headers["Location"] == url
    assert client.get(url).content == b"under the prefix"
    outside = client.put(f"{streams_server.origin}/{name}", headers=TEXT)
    assert outside.status_code == 404
    assert client.get(f"{streams_server.origin}/{name}").status_code == 404
    assert client.get(f"{streams_server.origin}/_electric/health").status_code == 200


# --- stopping ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stop_ends_live_reads_at_once_instead_of_waiting_them_out(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    """SIGTERM with an SSE reader, a long-poll and a live shape request open (a web UI's
    usual connections, each set to wait a minute): each is answered at once and the server
    exits well inside its 5 s graceful-shutdown timeout."""
    server = server_factory("serve", long_poll_timeout_ms=60_000)
    url = server.url(unique_name("stopping"))
    assert client.put(url, content=b"seed", headers=TEXT).status_code == 201
    tail = client.head(url).headers["Stream-Next-Offset"]
    shape = f"{server.origin}/_electric/electric/v1/shape"
    first = client.get(shape, params={"table": "entities", "offset": "-1"})
    assert first.status_code == 200, first.text
    live_shape = {
        "table": "entities",
        "handle": first.headers["electric-handle"],
        "offset": first.headers["electric-offset"],
        "live": "true",
    }
    outcomes: dict[str, object] = {}
    sse_open = threading.Event()

    def read_sse() -> None:
        with (
            httpx.Client(timeout=30) as http,
            http.stream("GET", url, params={"offset": tail, "live": "sse"}) as response,
        ):
            for line in response.iter_lines():
                if line.startswith("event: control"):
                    sse_open.set()
            outcomes["sse"] = "ended"

    def long_poll() -> None:
        with httpx.Client(timeout=30) as http:
            params = {"offset": tail, "live": "long-poll"}
            outcomes["long-poll"] = http.get(url, params=params).status_code

    def shape_poll() -> None:
        with httpx.Client(timeout=30) as http:
            outcomes["shape"] = http.get(shape, params=live_shape).status_code

    threads = [threading.Thread(target=f) for f in (read_sse, long_poll, shape_poll)]
    for thread in threads:
        thread.start()
    assert sse_open.wait(10)
    time.sleep(0.5)  # the long-poll and the shape request reach the server and park
    started = time.monotonic()
    assert server.stop() == 0
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join(10)
    assert outcomes == {"sse": "ended", "long-poll": 204, "shape": 200}
    assert elapsed < 3, f"stopping took {elapsed:.1f} s"

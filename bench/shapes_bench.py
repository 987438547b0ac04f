"""Shape API benchmark: time from a spawn to its row in live shapes, with many readers.

    .venv/bin/python bench/shapes_bench.py [--readers 100] [--spawns 100] [--interval 0.05]
        [--processes 1] [--database-url URL]

Starts `electric-agents serve` (embedded Postgres in a temp dir unless --database-url is
given; with --processes 2 readers use the second process), opens N live `entities` shape
readers speaking the Electric long-poll protocol (snapshot, then `live=true`), then spawns
entities one after another. For every spawn and every reader it records the time from the
moment the spawn's PUT was sent, and from the moment its 201 arrived (the commit is between
the two), to the moment that reader received the insert. Bounded: it stops after the last
spawn is seen by every reader or after --timeout seconds. Every process started is stopped
by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx

SHAPE_PATH = "/_electric/electric/v1/shape"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "electric-agents"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "electric_agents"]


async def start_server(
    database_url: str | None, data_dir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [*server_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--long-poll-timeout-ms", "20000"]
    argv += ["--database-url", database_url] if database_url else ["--data-dir", str(data_dir)]
    log = (data_dir / f"server-{port}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    origin = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited: {(data_dir / f'server-{port}.log').read_text()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{origin}/_electric/health")).status_code == 200:
                    return proc, origin
            await asyncio.sleep(0.1)
    raise RuntimeError("server did not become ready")


class RawHttp:
    """A bare HTTP/1.1 keep-alive GET client: 100 httpx long-polls in one process cost more
    CPU than the server under test, which would measure the client instead."""

    def __init__(self, origin: str) -> None:
        self.host, port = origin.removeprefix("http://").split(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n"
        self.writer.write(request.encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body


@dataclass
class Reader:
    origin: str
    seen: dict[str, float] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        http = RawHttp(self.origin)
        params = {"table": "entities", "offset": "-1"}
        while True:
            status, headers, body = await http.get(SHAPE_PATH + "?" + urlencode(params))
            now = time.perf_counter()
            if status == 409:
                params = {"table": "entities", "offset": "-1"}
                continue
            if status != 200:
                raise RuntimeError(f"shape read failed: {status} {body[:200]!r}")
            for message in json.loads(body):
                value = message.get("value")
                if value and message["headers"].get("operation") == "insert":
                    self.seen.setdefault(value["url"], now)
            params = {
                "table": "entities",
                "handle": headers["electric-handle"],
                "offset": headers["electric-offset"],
            }
            if "electric-up-to-date" in headers:
                self.ready.set()
                params["live"] = "true"
                if "electric-cursor" in headers:
                    params["cursor"] = headers["electric-cursor"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


async def bench(
    args: argparse.Namespace, data_dir: Path, procs: list[subprocess.Popen[bytes]]
) -> dict:
    database_url = args.database_url
    first, origin = await start_server(database_url, data_dir)
    procs.append(first)
    read_origin = origin
    if args.processes == 2:
        if database_url is None:
            raise SystemExit("--processes 2 needs --database-url (one database for both)")
        second, read_origin = await start_server(database_url, data_dir)
        procs.append(second)
    async with httpx.AsyncClient(timeout=60.0) as writer:
        type_name = f"bench-{uuid.uuid4().hex[:6]}"
        registered = await writer.post(
            f"{origin}/_electric/entity-types", json={"name": type_name, "description": "bench"}
        )
        registered.raise_for_status()
        readers = [Reader(read_origin) for _ in range(args.readers)]
        tasks = [asyncio.create_task(reader.run()) for reader in readers]
        await asyncio.wait_for(asyncio.gather(*(r.ready.wait() for r in readers)), 60)
        sent: dict[str, float] = {}
        acked: dict[str, float] = {}
        for i in range(args.spawns):
            url = f"/{type_name}/e{i}"
            sent[url] = time.perf_counter()
            response = await writer.put(f"{origin}/_electric/entities{url}", json={})
            acked[url] = time.perf_counter()
            response.raise_for_status()
            await asyncio.sleep(args.interval)
        deadline = time.perf_counter() + args.timeout
        while time.perf_counter() < deadline and not all(
            all(url in r.seen for url in sent) for r in readers
        ):
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [repr(o) for o in outcomes if not isinstance(o, asyncio.CancelledError)]
    from_sent = [r.seen[u] - sent[u] for r in readers for u in sent if u in r.seen]
    from_ack = [r.seen[u] - acked[u] for r in readers for u in sent if u in r.seen]
    spawn_rtt = [acked[u] - sent[u] for u in sent]
    expected = len(readers) * len(sent)

    def ms(values: list[float], p: float) -> float:
        return round(percentile(values, p) * 1000, 2)

    return {
        "readers": args.readers,
        "spawns": args.spawns,
        "processes": args.processes,
        "delivered": len(from_sent),
        "expected": expected,
        "from_spawn_sent_ms": {"p50": ms(from_sent, 50), "p99": ms(from_sent, 99)},
        "from_spawn_acked_ms": {"p50": ms(from_ack, 50), "p99": ms(from_ack, 99)},
        "spawn_rtt_ms": {"p50": ms(spawn_rtt, 50), "p99": ms(spawn_rtt, 99)},
        "reader_failures": failures[:5],
        "mean_from_sent_ms": round(statistics.fmean(from_sent) * 1000, 2),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--readers", type=int, default=100)
    parser.add_argument("--spawns", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.05, help="pause between spawns (s)")
    parser.add_argument("--processes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--timeout", type=float, default=30.0, help="wait for stragglers (s)")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="shapes-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        result = asyncio.run(bench(args, data_dir, procs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""What a durable append costs after an idle spell, against back to back, on this machine.

A long-poll delivery (workload 2) and a single append come after a pause, and on a VM that
pause is not free: the vCPUs halt, and waking them for a disk completion or a message from
another process costs more than the work. This measures the pieces a durable append is made
of, each p50 over interleaved rounds, after `--pause-ms` of sleep and with no pause:

* `fdatasync`: one 8 KiB write + fdatasync in the cluster's directory (a WAL flush);
* `select 1`: one round trip to a Postgres backend (one wake of another process and back);
* `append`: the append writer's real batch statement (`_APPEND_BATCH`), one 100-byte message
  with its NOTIFY, committed (round trip + execution + WAL flush + NOTIFY).

It starts its own embedded Postgres in a temporary directory and removes it after:

    .venv/bin/python bench/ceiling/idle_costs.py --rounds 200 --pause-ms 10

See docs/benchmarks.md ("Ceilings").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from electric_agents.db.embedded import EmbeddedPostgres
from electric_agents.db.migrations import apply_migrations
from electric_agents.streams import store
from electric_agents.streams.hub import CHANNEL
from electric_agents.streams.writer import _APPEND_BATCH

Step = Callable[[], Awaitable[None]]


async def measure(data_dir: Path, rounds: int, pause_s: float) -> dict[str, tuple[float, float]]:
    postgres = EmbeddedPostgres(data_dir / "pg")
    url = postgres.start()
    conn = await asyncpg.connect(url)
    listener = await asyncpg.connect(url)  # a server always listens for changes
    flush_fd = os.open(data_dir / "flush.bin", os.O_RDWR | os.O_CREAT)
    try:
        await apply_migrations(conn)
        await listener.add_listener(CHANNEL, lambda *_: None)
        stream_id = await store.insert_stream(
            conn,
            path="/idle-costs",
            content_type="application/octet-stream",
            ttl_seconds=None,
            expires_at=None,
            expires_at_ts=None,
            tail=0,
        )
        tail = 0
        os.write(flush_fd, b"\0" * 8192)

        async def flush() -> None:
            os.pwrite(flush_fd, b"y" * 8192, 0)
            os.fdatasync(flush_fd)

        async def select_one() -> None:
            await conn.fetchval("SELECT 1")

        async def append() -> None:
            nonlocal tail
            new_tail = tail + 100
            await conn.fetchval(
                _APPEND_BATCH,
                [stream_id], [tail], [False], [new_tail], [False],
                [None], [None], [None], [None],
                [stream_id], [new_tail], [b"x" * 100],
                [], [], [], [],
                CHANNEL, [f"bench {new_tail}:0:/idle-costs"],
            )  # fmt: skip
            tail = new_tail

        steps: dict[str, Step] = {"fdatasync": flush, "select 1": select_one, "append": append}
        samples: dict[str, dict[bool, list[float]]] = {
            name: {True: [], False: []} for name in steps
        }
        for _ in range(rounds):
            for name, step in steps.items():
                for paused in (True, False):
                    await asyncio.sleep(pause_s if paused else 0)
                    started = time.perf_counter()
                    await step()
                    samples[name][paused].append((time.perf_counter() - started) * 1e6)
        return {
            name: (statistics.median(by[True]), statistics.median(by[False]))
            for name, by in samples.items()
        }
    finally:
        os.close(flush_fd)
        await listener.close()
        await conn.close()
        postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--pause-ms", type=float, default=10.0)
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="idle-costs-"))
    try:
        results = asyncio.run(measure(data_dir, args.rounds, args.pause_ms / 1000))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"p50 over {args.rounds} rounds, us | after {args.pause_ms:g} ms idle | back to back")
    for name, (paused, hot) in results.items():
        print(f"{name:>9} | {paused:>8.0f} | {hot:>8.0f}")


if __name__ == "__main__":
    main()

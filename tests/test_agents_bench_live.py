"""The agents bench's live reader (bench/agentsbench/live.py) and its client-side cron stream
path, against real servers: the figures of scenarios 5 and 6 are only as good as these."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest

from conftest import ServerProcess

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from agentsbench.coordination import EVERY_SECOND, cron_stream_url
from agentsbench.live import LiveReader
from streambench.wire import ProtocolError, session

JSON = {"Content-Type": "application/json"}


def note(n: int) -> dict[str, object]:
    return {"type": "note", "key": f"n-{n}", "value": {"n": n}}


def is_note(event: dict[str, object]) -> bool:
    return event.get("type") == "note"


async def test_live_reader_reads_the_backlog_then_each_append_as_it_lands(
    shared_server: ServerProcess,
) -> None:
    url = f"{shared_server.base_url}/live-{time.time_ns()}"
    async with httpx.AsyncClient(trust_env=False) as http:
        created = await http.put(url, headers=JSON, content=json.dumps([note(0)]))
        assert created.status_code == 201, created.text
        async with session(0, timeout_s=30) as reader_http:
            reader = LiveReader(reader_http, url).start()
            try:
                [backlog] = await reader.wait_for(is_note, 1, 5)
                assert backlog.event["value"] == {"n": 0}
                for n in (1, 2):
                    await asyncio.sleep(0.05)  # let the reader park its long-poll
                    before = time.perf_counter()
                    appended = await http.post(url, headers=JSON, content=json.dumps([note(n)]))
                    assert appended.status_code in (200, 204), appended.text
                    arrivals = await reader.wait_for(is_note, n + 1, 5)
                    # Read live: after the append started, not from an old response.
                    assert arrivals[n].at > before
                    assert arrivals[n].event["key"] == f"n-{n}"
                assert [a.event["value"]["n"] for a in reader.matching(is_note)] == [0, 1, 2]
                # Fewer events than asked for: a timeout, not a hang.
                with pytest.raises(TimeoutError):
                    await reader.wait_for(is_note, 4, 0.3)
            finally:
                await reader.close()


async def test_live_reader_on_a_missing_stream_fails_its_waiters_at_once(
    shared_server: ServerProcess,
) -> None:
    url = f"{shared_server.base_url}/never-created-{time.time_ns()}"
    async with session(0, timeout_s=30) as http:
        reader = LiveReader(http, url).start()
        try:
            started = time.monotonic()
            with pytest.raises(ProtocolError, match="404"):
                await reader.first(is_note, 10)
            assert time.monotonic() - started < 5
            # Later waits see the same failure instead of waiting out their timeout.
            with pytest.raises(ProtocolError, match="404"):
                await reader.first(is_note, 10)
        finally:
            await reader.close()


async def test_client_side_cron_stream_path_is_the_one_the_server_registers(
    serve_server: ServerProcess,
) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        for timezone in ("UTC", "Europe/Berlin"):
            response = await http.post(
                f"{serve_server.origin}/_electric/cron/register",
                json={"expression": EVERY_SECOND, "timezone": timezone},
            )
            assert response.status_code == 200, response.text
            assert response.json()["streamUrl"] == cron_stream_url(EVERY_SECOND, timezone)


async def test_live_reader_whose_server_dies_mid_long_poll_fails_instead_of_hanging(
    streams_server: ServerProcess,
) -> None:
    url = f"{streams_server.base_url}/dying-{time.time_ns()}"
    async with httpx.AsyncClient(trust_env=False) as http:
        created = await http.put(url, headers=JSON, content=json.dumps([note(0)]))
        assert created.status_code == 201, created.text
    async with session(0, timeout_s=30) as http_session:
        reader = LiveReader(http_session, url).start()
        try:
            await reader.wait_for(is_note, 1, 5)
            await asyncio.sleep(0.1)  # parked on the tail
            streams_server.kill9()
            started = time.monotonic()
            with pytest.raises(aiohttp.ClientError):
                await reader.wait_for(is_note, 2, 20)
            # Well before the long-poll timeout or the wait's own.
            assert time.monotonic() - started < 5
        finally:
            await reader.close()

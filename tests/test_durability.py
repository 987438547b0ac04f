"""kill -9 of the server: what was acknowledged survives, exactly once and where the server
said it was; producers and live readers pick up where they stopped after a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import (
    ServerFactory,
    ServerProcess,
    SseEvent,
    producer_headers,
    read_all,
    sse_events,
    unique_name,
)

TEXT = {"Content-Type": "text/plain"}
STREAMS = 3
PRODUCERS_PER_STREAM = 2
ACKS_BEFORE_KILL = 1000
LOAD_DEADLINE_S = 30.0
WAIT_S = 5.0


@dataclass
class Writer:
    url: str
    producer: str
    acked: dict[int, str] = field(default_factory=dict)  # seq -> Stream-Next-Offset
    unanswered: int | None = None  # the seq in flight when the server died
    next_seq: int = 0

    def body(self, seq: int) -> bytes:
        return f"{self.producer}:{seq}\n".encode()


async def write_until_the_server_dies(http: httpx.AsyncClient, writer: Writer) -> None:
    """Append seq after seq with producer headers until a request gets no answer."""
    while True:
        seq = writer.next_seq
        try:
            response = await http.post(
                writer.url,
                content=writer.body(seq),
                headers={**TEXT, **producer_headers(writer.producer, 0, seq)},
            )
        except httpx.TransportError:
            writer.unanswered = seq
            return
        assert response.status_code == 200, (response.status_code, response.text)
        writer.acked[seq] = response.headers["Stream-Next-Offset"]
        writer.next_seq = seq + 1


def stored_lines(content: bytes) -> list[bytes]:
    assert content.endswith(b"\n") or content == b""
    return content.split(b"\n")[:-1]


def check_stream(client: httpx.Client, url: str, writers: list[Writer]) -> bytes:
    """Every acknowledged append is there once, at the offset it was acknowledged with,
    each producer's seqs appear in order with no gap and no duplicate."""
    content, _ = read_all(client, url)
    lines = stored_lines(content)
    assert len(lines) == len(set(lines)), "duplicate appends"
    for writer in writers:
        mine = [line for line in lines if line.startswith(f"{writer.producer}:".encode())]
        seqs = [int(line.split(b":")[1]) for line in mine]
        assert seqs == list(range(len(seqs))), f"{writer.producer}: gap or reorder in {seqs}"
        last_acked = max(writer.acked, default=-1)
        # Everything acknowledged, plus at most the one request that got no answer.
        assert last_acked + 1 <= len(seqs) <= last_acked + 2, (writer.producer, len(seqs))
        for seq, offset in writer.acked.items():
            after, _ = read_all(client, url, offset)
            before = content[: len(content) - len(after)]
            assert content.endswith(after)
            assert before.endswith(writer.body(seq)), f"{writer.producer}:{seq} not at {offset}"
    return content


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_acknowledged_appends_survive_kill_9_with_same_offsets(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    server = server_factory("streams")
    urls = [server.url(unique_name(f"durable{i}")) for i in range(STREAMS)]
    for url in urls:
        assert client.put(url, headers=TEXT).status_code == 201
    writers = [Writer(url, f"w{i}-{j}") for i, url in enumerate(urls) for j in range(2)]

    async with httpx.AsyncClient(timeout=30) as http:
        load = [asyncio.create_task(write_until_the_server_dies(http, w)) for w in writers]
        deadline = time.monotonic() + LOAD_DEADLINE_S
        while sum(len(w.acked) for w in writers) < ACKS_BEFORE_KILL:
            assert time.monotonic() < deadline, "load never reached its acknowledgement count"
            assert not any(t.done() for t in load), [t.exception() for t in load if t.done()]
            await asyncio.sleep(0.02)
        server.kill9()
        await asyncio.wait_for(asyncio.gather(*load), timeout=30)

    assert all(w.unanswered is not None for w in writers)
    server.start()
    for url in urls:
        check_stream(client, url, [w for w in writers if w.url == url])

    # Producers resume: the unanswered seq is either stored now (200) or was (204).
    for writer in writers:
        seq = writer.unanswered
        assert seq is not None
        content = client.get(writer.url).content
        already = writer.body(seq).rstrip(b"\n") in stored_lines(content)
        retry = client.post(
            writer.url,
            content=writer.body(seq),
            headers={**TEXT, **producer_headers(writer.producer, 0, seq)},
        )
        assert retry.status_code == (204 if already else 200), (writer.producer, seq, retry.text)
        nxt = client.post(
            writer.url,
            content=writer.body(seq + 1),
            headers={**TEXT, **producer_headers(writer.producer, 0, seq + 1)},
        )
        assert nxt.status_code == 200, (nxt.status_code, nxt.text)
        skipped = client.post(
            writer.url,
            content=b"gap\n",
            headers={**TEXT, **producer_headers(writer.producer, 0, seq + 3)},
        )
        assert skipped.status_code == 409
        assert skipped.headers["Producer-Expected-Seq"] == str(seq + 2)

    for url in urls:
        content, _ = read_all(client, url)
        lines = stored_lines(content)
        assert len(lines) == len(set(lines))
        for writer in (w for w in writers if w.url == url):
            seqs = [
                int(x.split(b":")[1]) for x in lines if x.startswith(f"{writer.producer}:".encode())
            ]
            assert seqs == list(range((writer.unanswered or 0) + 2))


async def first_control(events: AsyncIterator[SseEvent]) -> dict[str, object]:
    async for event in events:
        if event.event == "control":
            return event.control()
    raise AssertionError("SSE ended before a control event")


async def next_data(events: AsyncIterator[SseEvent]) -> tuple[str, str]:
    """The next data event and the offset of the control event that follows it."""
    data = None
    async for event in events:
        if event.event == "data":
            data = event.data
        elif event.event == "control" and data is not None:
            return data, str(event.control()["streamNextOffset"])
    raise AssertionError("SSE ended before data arrived")


@pytest.mark.timeout(120)
async def test_live_readers_resume_from_their_offset_after_kill_9(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    # A long long-poll timeout: a reader only gets data in time if an append wakes it.
    server: ServerProcess = server_factory("streams", long_poll_timeout_ms=30_000)
    url = server.url(unique_name("readers"))
    created = client.put(url, content=b"before;", headers=TEXT)
    assert created.status_code == 201
    tail = created.headers["Stream-Next-Offset"]

    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5)) as http:
        long_poll = asyncio.create_task(http.get(url, params={"offset": tail, "live": "long-poll"}))
        async with http.stream("GET", url, params={"offset": "-1", "live": "sse"}) as sse:
            events = sse_events(sse)
            data, sse_offset = await asyncio.wait_for(next_data(events), WAIT_S)
            assert (data, sse_offset) == ("before;", tail)
            await asyncio.sleep(0.3)  # let the long-poll reach its wait
            assert not long_poll.done()
            server.kill9()
            with pytest.raises(httpx.TransportError):
                await asyncio.wait_for(first_control(events), WAIT_S)
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(long_poll, WAIT_S)

        server.start()
        # Written while the readers were away: delivered at once on reconnect.
        missed = client.post(url, content=b"missed;", headers=TEXT)
        assert missed.status_code == 204
        long_poll = asyncio.create_task(http.get(url, params={"offset": tail, "live": "long-poll"}))
        async with http.stream("GET", url, params={"offset": sse_offset, "live": "sse"}) as sse:
            events = sse_events(sse)
            data, sse_offset = await asyncio.wait_for(next_data(events), WAIT_S)
            assert (data, sse_offset) == ("missed;", missed.headers["Stream-Next-Offset"])
            response = await asyncio.wait_for(long_poll, WAIT_S)
            assert response.status_code == 200
            assert response.content == b"missed;"
            # And new appends still wake them.
            long_poll = asyncio.create_task(
                http.get(
                    url,
                    params={"offset": response.headers["Stream-Next-Offset"], "live": "long-poll"},
                )
            )
            await asyncio.sleep(0.2)
            after = client.post(url, content=b"after;", headers=TEXT)
            assert after.status_code == 204
            data, sse_offset = await asyncio.wait_for(next_data(events), WAIT_S)
            assert (data, sse_offset) == ("after;", after.headers["Stream-Next-Offset"])
            response = await asyncio.wait_for(long_poll, WAIT_S)
            assert (response.status_code, response.content) == (200, b"after;")

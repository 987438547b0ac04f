"""Two server processes on one database behave as one server: what one writes the other
reads, appends through one wake live readers on the other (LISTEN/NOTIFY), concurrent
appends through both are stored once each in one order, and producer fencing holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
WAKE_S = 5.0
# Long enough that a reader answered within WAKE_S was woken by the append, not by a timeout.
LONG_POLL_MS = 30_000


@pytest.fixture
def pair(server_factory: ServerFactory) -> tuple[ServerProcess, ServerProcess]:
    a = server_factory("streams", long_poll_timeout_ms=LONG_POLL_MS)
    b = server_factory("streams", long_poll_timeout_ms=LONG_POLL_MS)
    assert a.database_url == b.database_url and a.port != b.port
    return a, b


@pytest.mark.timeout(60)
def test_stream_created_via_one_process_is_readable_via_the_other(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.Client
) -> None:
    a, b = pair
    name = unique_name("shared")
    created = client.put(a.url(name), content=b"hello", headers=TEXT)
    assert created.status_code == 201
    head = client.head(b.url(name))
    assert head.status_code == 200
    assert head.headers["Stream-Next-Offset"] == created.headers["Stream-Next-Offset"]
    assert client.get(b.url(name)).content == b"hello"
    appended = client.post(b.url(name), content=b" world", headers=TEXT)
    assert appended.status_code == 204
    assert client.get(a.url(name)).content == b"hello world"
    # Idempotent create through the other process sees the same stream.
    assert client.put(b.url(name), headers=TEXT).status_code == 200
    assert client.delete(a.url(name)).status_code == 204
    assert client.get(b.url(name)).status_code == 404


async def next_data(events: AsyncIterator[SseEvent]) -> tuple[str, str]:
    data = None
    async for event in events:
        if event.event == "data":
            data = event.data
        elif event.event == "control" and data is not None:
            return data, str(event.control()["streamNextOffset"])
    raise AssertionError("SSE ended before data arrived")


@pytest.mark.timeout(60)
async def test_append_via_one_process_wakes_long_poll_on_the_other(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    name = unique_name("wake-lp")
    async with httpx.AsyncClient(timeout=60) as http:
        created = await http.put(a.url(name), headers=TEXT)
        tail = created.headers["Stream-Next-Offset"]
        for round_number in range(3):
            waiting = asyncio.create_task(
                http.get(b.url(name), params={"offset": tail, "live": "long-poll"})
            )
            await asyncio.sleep(0.3)
            assert not waiting.done(), "long-poll answered before any append"
            body = f"append-{round_number}".encode()
            appended = await http.post(a.url(name), content=body, headers=TEXT)
            assert appended.status_code == 204
            response = await asyncio.wait_for(waiting, WAKE_S)
            assert response.status_code == 200
            assert response.content == body
            tail = response.headers["Stream-Next-Offset"]
            assert tail == appended.headers["Stream-Next-Offset"]
        # Closing through A ends B's wait with EOF.
        waiting = asyncio.create_task(
            http.get(b.url(name), params={"offset": tail, "live": "long-poll"})
        )
        await asyncio.sleep(0.3)
        closed = await http.post(a.url(name), headers={"Stream-Closed": "true"})
        assert closed.status_code == 204
        response = await asyncio.wait_for(waiting, WAKE_S)
        assert response.status_code == 204
        assert response.headers["Stream-Closed"] == "true"


@pytest.mark.timeout(60)
async def test_append_via_one_process_wakes_sse_on_the_other(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    name = unique_name("wake-sse")
    async with httpx.AsyncClient(timeout=60) as http:
        created = await http.put(a.url(name), content=b"first", headers=TEXT)
        assert created.status_code == 201
        async with http.stream("GET", b.url(name), params={"offset": "-1", "live": "sse"}) as sse:
            events = sse_events(sse)
            assert await asyncio.wait_for(next_data(events), WAKE_S) == (
                "first",
                created.headers["Stream-Next-Offset"],
            )
            for body in ("second", "third"):
                appended = await http.post(a.url(name), content=body.encode(), headers=TEXT)
                assert appended.status_code == 204
                assert await asyncio.wait_for(next_data(events), WAKE_S) == (
                    body,
                    appended.headers["Stream-Next-Offset"],
                )


@pytest.mark.timeout(120)
async def test_concurrent_appends_through_both_processes_are_stored_once_in_offset_order(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.Client
) -> None:
    a, b = pair
    name = unique_name("both")
    assert client.put(a.url(name), headers=TEXT).status_code == 201
    per_writer = 60
    acks: list[tuple[str, bytes]] = []

    async def writer(http: httpx.AsyncClient, server: ServerProcess, label: str) -> None:
        for i in range(per_writer):
            body = f"[{label}.{i}]".encode()
            response = await http.post(server.url(name), content=body, headers=TEXT)
            assert response.status_code == 204, (response.status_code, response.text)
            acks.append((response.headers["Stream-Next-Offset"], body))

    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(
            *(writer(http, a, f"a{i}") for i in range(4)),
            *(writer(http, b, f"b{i}") for i in range(4)),
        )
    offsets = [offset for offset, _ in acks]
    assert len(set(offsets)) == len(acks) == 8 * per_writer, "two appends got one offset"
    in_offset_order = b"".join(body for _, body in sorted(acks))
    for server in (a, b):
        content, tail = read_all(client, server.url(name))
        assert content == in_offset_order
        assert tail == max(offsets)
    # Each writer's own appends got strictly increasing offsets, in the order it sent them.
    for label in [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)]:
        mine = [offset for offset, body in acks if body.startswith(f"[{label}.".encode())]
        assert mine == sorted(mine) and len(mine) == per_writer


@pytest.mark.timeout(60)
def test_one_producer_alternating_between_processes_is_deduplicated(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.Client
) -> None:
    a, b = pair
    name = unique_name("alternate")
    assert client.put(a.url(name), headers=TEXT).status_code == 201
    for seq in range(10):
        first, second = (a, b) if seq % 2 == 0 else (b, a)
        body = f"<{seq}>".encode()
        accepted = client.post(
            first.url(name), content=body, headers={**TEXT, **producer_headers("p", 0, seq)}
        )
        assert accepted.status_code == 200, (seq, accepted.status_code, accepted.text)
        # The retry through the other process is recognized as a duplicate.
        retried = client.post(
            second.url(name), content=body, headers={**TEXT, **producer_headers("p", 0, seq)}
        )
        assert retried.status_code == 204, (seq, retried.status_code, retried.text)
        assert retried.headers["Producer-Seq"] == str(seq)
        assert retried.headers["Stream-Next-Offset"] == accepted.headers["Stream-Next-Offset"]
    assert client.get(a.url(name)).content == b"".join(f"<{s}>".encode() for s in range(10))


@pytest.mark.timeout(60)
def test_epoch_bump_via_one_process_fences_the_stale_epoch_on_the_other(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.Client
) -> None:
    a, b = pair
    name = unique_name("fence")
    assert client.put(a.url(name), headers=TEXT).status_code == 201
    # B has seen producer p at epoch 0 (and may cache it).
    for seq in range(3):
        ok = client.post(
            b.url(name),
            content=f"old{seq};".encode(),
            headers={**TEXT, **producer_headers("p", 0, seq)},
        )
        assert ok.status_code == 200
    bump = client.post(
        a.url(name), content=b"new0;", headers={**TEXT, **producer_headers("p", 1, 0)}
    )
    assert bump.status_code == 200
    for seq in (3, 2, 0):
        stale = client.post(
            b.url(name), content=b"zombie;", headers={**TEXT, **producer_headers("p", 0, seq)}
        )
        assert stale.status_code == 403, (seq, stale.status_code, stale.text)
        assert stale.headers["Producer-Epoch"] == "1"
    # The new epoch continues through B, and a duplicate through A is recognized.
    nxt = client.post(
        b.url(name), content=b"new1;", headers={**TEXT, **producer_headers("p", 1, 1)}
    )
    assert nxt.status_code == 200
    dup = client.post(
        a.url(name), content=b"new1;", headers={**TEXT, **producer_headers("p", 1, 1)}
    )
    assert dup.status_code == 204
    assert client.get(a.url(name)).content == b"old0;old1;old2;new0;new1;"


@pytest.mark.timeout(60)
def test_close_and_recreate_via_one_process_are_seen_by_the_others_appends(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.Client
) -> None:
    a, b = pair
    name = unique_name("lifecycle")
    assert client.put(a.url(name), headers=TEXT).status_code == 201
    # B appends first, so it has the stream's state at hand.
    assert client.post(b.url(name), content=b"one;", headers=TEXT).status_code == 204
    closed = client.post(a.url(name), headers={"Stream-Closed": "true"})
    assert closed.status_code == 204
    late = client.post(b.url(name), content=b"late;", headers=TEXT)
    assert late.status_code == 409, (late.status_code, late.text)
    assert late.headers["Stream-Closed"] == "true"
    assert late.headers["Stream-Next-Offset"] == closed.headers["Stream-Next-Offset"]

    assert client.delete(a.url(name)).status_code == 204
    gone = client.post(b.url(name), content=b"gone;", headers=TEXT)
    assert gone.status_code == 404, (gone.status_code, gone.text)
    assert client.put(a.url(name), headers=TEXT).status_code == 201
    fresh = client.post(b.url(name), content=b"fresh;", headers=TEXT)
    assert fresh.status_code == 204, (fresh.status_code, fresh.text)
    assert client.get(a.url(name)).content == b"fresh;"

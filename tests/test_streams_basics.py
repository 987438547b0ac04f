"""Stream behaviours the conformance suite only touches lightly: State Protocol offset
stamping, sliding TTL, fork chains, soft-deleted sources, and long chunked catch-up."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any

import httpx
import pytest

from conftest import (
    ServerProcess,
    create_stream,
    read_all,
    read_json,
    sse_events,
    tail_offset,
    unique_name,
)

TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}
OFFSET_RE = re.compile(r"^\d{16}_\d{16}$")


def append(client: httpx.Client, url: str, body: bytes, headers: dict[str, str] = TEXT) -> str:
    response = client.post(url, content=body, headers=headers)
    assert response.status_code == 204, (response.status_code, response.text)
    return response.headers["Stream-Next-Offset"]


# --- State Protocol offsets (spec/01 §A.21, §B.6) ------------------------------------------


def change(key: str, **headers: Any) -> dict[str, Any]:
    return {"type": "user", "key": key, "value": {"name": key}, "headers": headers}


async def sse_json_values(url: str) -> list[Any]:
    """Every JSON value an SSE read from the start delivers before it is up to date."""
    values: list[Any] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response,
    ):
        async for event in sse_events(response):
            if event.event == "data":
                values.extend(json.loads(event.data))
            elif event.event == "control" and event.control().get("upToDate"):
                return values
    raise AssertionError("SSE ended before it was up to date")


@pytest.mark.timeout(60)
async def test_state_messages_are_stamped_with_the_offset_of_their_post(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    url = shared_server.url(unique_name("state"))
    create_stream(client, url, "application/json")
    batch = [change("u1", operation="insert", txid="t1"), change("u2", operation="update")]
    first = append(client, url, json.dumps(batch).encode(), JSON)
    control = {"headers": {"control": "snapshot-start"}}
    second = append(client, url, json.dumps(control).encode(), JSON)
    others = [
        {"plain": 1, "headers": {"x": 1}},  # no operation/control: left alone
        {"type": "user", "key": "u3", "headers": {"operation": 7}},  # not a string
        [1, {"headers": {"operation": "insert"}}],  # nested in an array: not a message
        "text",
    ]
    third = append(client, url, json.dumps(others).encode(), JSON)
    spoofed = change("u4", operation="delete", offset="bogus")
    fourth = append(client, url, json.dumps(spoofed).encode(), JSON)
    assert len({first, second, third, fourth}) == 4
    assert all(OFFSET_RE.match(o) for o in (first, second, third, fourth))

    expected = [
        change("u1", operation="insert", txid="t1", offset=first),
        change("u2", operation="update", offset=first),
        {"headers": {"control": "snapshot-start", "offset": second}},
        *others,
        change("u4", operation="delete", offset=fourth),
    ]
    assert read_json(client, url) == expected
    # Reading from the middle keeps the stamps of the original POSTs.
    assert read_json(client, url, first) == expected[2:]
    assert await sse_json_values(url) == expected


# --- sliding TTL (spec/01 §A.17) -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_sliding_ttl_is_refreshed_by_get_but_not_by_head(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    ttl_s = 2
    url = shared_server.url(unique_name("ttl"))
    create_stream(client, url, body=b"alive", headers={"Stream-TTL": str(ttl_s)})
    # GETs every 0.4 s keep it alive well past its TTL.
    started = time.monotonic()
    while time.monotonic() - started < 2.5 * ttl_s:
        read = client.get(url)
        assert read.status_code == 200, "expired although GETs kept touching it"
        assert read.content == b"alive"
        time.sleep(0.4)
    client.get(url, params={"offset": "now"})
    last_touch = time.monotonic()
    # HEADs alone do not: it expires about ttl_s after the last GET.
    statuses = []
    while time.monotonic() - last_touch < ttl_s + 3:
        statuses.append((round(time.monotonic() - last_touch, 1), client.head(url).status_code))
        if statuses[-1][1] == 404:
            break
        time.sleep(0.2)
    assert statuses[0][1] == 200
    assert statuses[-1][1] == 404, f"HEADs kept it alive: {statuses}"
    assert statuses[-1][0] >= ttl_s - 0.5, f"expired too early: {statuses}"
    assert client.get(url).status_code == 404


# --- forks (spec/01 §A.16, §A.8) -----------------------------------------------------------


def fork(
    client: httpx.Client, server: ServerProcess, name: str, source: str, offset: str | None
) -> str:
    url = server.url(name)
    headers = {"Stream-Forked-From": f"{server.stream_prefix}/{source}"}
    if offset is not None:
        headers["Stream-Fork-Offset"] = offset
    response = client.put(url, headers=headers)
    assert response.status_code == 201, (response.status_code, response.text)
    return url


@pytest.mark.timeout(60)
def test_fork_of_a_fork_reads_stitched_across_three_levels(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    a_name, b_name, c_name = (unique_name(n) for n in ("a", "b", "c"))
    a = shared_server.url(a_name)
    create_stream(client, a)
    oa1, oa2 = append(client, a, b"A1;"), append(client, a, b"A2;")
    append(client, a, b"A3;")

    b = fork(client, shared_server, b_name, a_name, oa2)
    assert client.get(b).content == b"A1;A2;"
    ob1 = append(client, b, b"B1;")
    append(client, b, b"B2;")

    c = fork(client, shared_server, c_name, b_name, ob1)
    oc1 = append(client, c, b"C1;")
    # Later appends upstream never show in a fork.
    append(client, a, b"A4;")
    append(client, b, b"B3;")

    assert client.get(a).content == b"A1;A2;A3;A4;"
    assert client.get(b).content == b"A1;A2;B1;B2;B3;"
    assert oa1 < oa2 < ob1 < oc1
    for start, expected in [
        ("-1", b"A1;A2;B1;C1;"),
        (oa1, b"A2;B1;C1;"),
        (oa2, b"B1;C1;"),
        (ob1, b"C1;"),
        (oc1, b""),
    ]:
        content, tail = read_all(client, c, start)
        assert (start, content) == (start, expected)
        assert tail == oc1
    head = client.head(c)
    assert head.headers["Stream-Next-Offset"] == oc1
    assert "Stream-Forked-From" not in head.headers
    # Long-poll inside the inherited range answers at once with the inherited data.
    response = client.get(c, params={"offset": oa1, "live": "long-poll"})
    assert response.status_code == 200
    assert response.content.startswith(b"A2;")


@pytest.mark.timeout(60)
def test_deleted_source_with_a_live_fork_is_gone_but_readable_through_the_fork(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    source_name, fork_name = unique_name("src"), unique_name("fork")
    source = shared_server.url(source_name)
    create_stream(client, source, body=b"one;")
    append(client, source, b"two;")
    forked = fork(client, shared_server, fork_name, source_name, None)
    append(client, forked, b"mine;")

    assert client.delete(source).status_code == 204
    for method, headers, body in [
        ("GET", {}, b""),
        ("HEAD", {}, b""),
        ("POST", TEXT, b"more"),
        ("DELETE", {}, b""),
    ]:
        response = client.request(method, source, headers=headers, content=body)
        assert response.status_code == 410, (method, response.status_code)
        if method != "HEAD":
            assert response.json()["error"]["code"]
    assert client.put(source, headers=TEXT).status_code == 409
    assert client.get(source, params={"offset": "-1", "live": "long-poll"}).status_code == 410
    another = client.put(
        shared_server.url(unique_name("fork2")),
        headers={"Stream-Forked-From": f"{shared_server.stream_prefix}/{source_name}"},
    )
    assert another.status_code == 409

    assert client.get(forked).content == b"one;two;mine;"
    append(client, forked, b"more;")
    assert client.get(forked).content == b"one;two;mine;more;"

    # Deleting the last fork removes the source for good; the path is free again.
    assert client.delete(forked).status_code == 204
    assert client.get(source).status_code == 404
    recreated = client.put(source, headers=TEXT)
    assert recreated.status_code == 201
    assert client.get(source).content == b""


# --- long catch-up -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_long_catch_up_resumes_exactly_across_chunks(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    url = shared_server.url(unique_name("big"))
    create_stream(client, url, "application/octet-stream")
    data = b"".join(os.urandom(1024 * 1024) for _ in range(9))
    for start in range(0, len(data), 1024 * 1024):
        append(
            client,
            url,
            data[start : start + 1024 * 1024],
            {"Content-Type": "application/octet-stream"},
        )

    boundaries: list[tuple[str, int]] = []
    received = b""
    offset = "-1"
    for _ in range(100):
        response = client.get(url, params={"offset": offset})
        assert response.status_code == 200
        received += response.content
        offset = response.headers["Stream-Next-Offset"]
        boundaries.append((offset, len(received)))
        if response.headers.get("Stream-Up-To-Date") == "true":
            break
    assert received == data
    assert client.head(url).headers["Stream-Next-Offset"] == offset
    # Every chunk's Stream-Next-Offset resumes exactly where that chunk ended.
    for boundary, position in boundaries:
        rest, tail = read_all(client, url, boundary)
        assert rest == data[position:], f"resume from {boundary} is not byte-exact"
        assert tail == offset


# --- shared encodings: SSE data events and catch-up bodies ---------------------------------


@pytest.mark.timeout(60)
async def test_recreated_stream_never_gets_the_old_streams_encoded_events(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    """SSE data events and catch-up bodies are encoded once per (stream, range) and shared
    by readers; a stream deleted and created again under the same path, with other data at
    the same offsets, must be read as its new self."""
    url = shared_server.url(unique_name("recreated"))
    # Larger than the read cache's smallest kept range (16 KiB), same length each life.
    for content in (b"first-life" * 2000, b"other-life" * 2000):
        create_stream(client, url, "text/plain")
        append(client, url, content)
        for _ in range(2):  # the second SSE read and catch-up come from the shared encodings
            assert (await sse_text(url)) == content
            assert read_all(client, url)[0] == content
        assert client.delete(url).status_code == 204


async def sse_text(url: str) -> bytes:
    """What an SSE read from the start of a text stream delivers until it is up to date."""
    data = b""
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("GET", url, params={"offset": "-1", "live": "sse"}) as response,
    ):
        async for event in sse_events(response):
            if event.event == "data":
                data += event.data.encode()
            elif event.event == "control" and event.control().get("upToDate"):
                return data
    raise AssertionError("SSE ended before it was up to date")


# --- SSE readers at the tail are written to by the commit itself -----------------------------


async def follow_sse(url: str, ready: asyncio.Event | None = None) -> tuple[bytes, str]:
    """An SSE reader from `now` to the stream's close: the data it got and its last offset.
    `ready` is set once the reader has its first control event (it is at the tail)."""
    data = b""
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("GET", url, params={"offset": "now", "live": "sse"}) as response,
    ):
        assert response.status_code == 200
        async for event in sse_events(response):
            if event.event == "data":
                data += event.data.encode()
            elif event.event == "control":
                control = event.control()
                if ready is not None:
                    ready.set()
                if control.get("streamClosed"):
                    return data, control["streamNextOffset"]
    raise AssertionError("SSE ended before the stream closed")


async def close_stream(http: httpx.AsyncClient, url: str) -> str:
    response = await http.post(url, headers={**TEXT, "Stream-Closed": "true"})
    assert response.status_code == 204, response.text
    return response.headers["Stream-Next-Offset"]


@pytest.mark.timeout(120)
async def test_sse_readers_following_concurrent_writers_get_every_message_once(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    """Readers parked at the tail are handed each commit's event directly; with writers
    racing each other, every reader must still see exactly the stream, in order."""
    url = shared_server.url(unique_name("follow"))
    create_stream(client, url, "text/plain")
    readies = [asyncio.Event() for _ in range(12)]
    readers = [asyncio.create_task(follow_sse(url, ready)) for ready in readies]
    await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 30)

    async def writer(http: httpx.AsyncClient, name: str) -> None:
        for i in range(40):
            body = f"<{name}:{i}{'|line two' if i % 7 == 0 else ''}>".replace("|", "\n")
            response = await http.post(url, content=body.encode(), headers=TEXT)
            assert response.status_code == 204, response.text

    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(writer(http, f"w{n}") for n in range(4)))
        final = await close_stream(http, url)
    stored, tail = read_all(client, url)
    assert tail == final and stored.count(b"<") == 160
    for data, last in await asyncio.gather(*readers):
        assert last == final
        assert data == stored


@pytest.mark.timeout(120)
async def test_sse_reader_that_stops_reading_falls_behind_and_catches_up_whole(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    """A reader that does not read while megabytes are appended cannot be written to
    directly (its connection backs up); it must get everything, in order, once it reads."""
    url = shared_server.url(unique_name("slow-follow"))
    create_stream(client, url, "text/plain")
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("GET", url, params={"offset": "now", "live": "sse"}) as response,
    ):
        events = sse_events(response)
        first = await anext(events)
        assert first.event == "control"
        # Not reading now: 40 appends of 256 KiB fill the socket buffers behind this reader.
        for i in range(40):
            body = f"[{i:02d}]".encode() * (64 * 1024)  # 256 KiB
            await http.post(url, content=body, headers=TEXT)
        final = await close_stream(http, url)
        data = b""
        async for event in events:
            if event.event == "data":
                data += event.data.encode()
            elif event.event == "control" and event.control().get("streamClosed"):
                assert event.control()["streamNextOffset"] == final
                break
    assert data == read_all(client, url)[0]
    assert len(data) == 40 * 256 * 1024


# --- Long-poll readers at the tail are answered by the commit itself ------------------------


async def follow_long_poll(url: str, start: str, ready: asyncio.Event) -> tuple[bytes, str]:
    """Long-polls from `start`, each from the last answer's next offset, until the stream is
    closed: the data received and the final offset."""
    data = b""
    offset = start
    cursor: str | None = None
    async with httpx.AsyncClient(timeout=60) as http:
        while True:
            params = {
                "offset": offset,
                "live": "long-poll",
                **({"cursor": cursor} if cursor else {}),
            }
            request = asyncio.ensure_future(http.get(url, params=params))
            if not ready.is_set():  # the first long-poll has had time to park
                await asyncio.sleep(0.05)
                ready.set()
            response = await request
            assert response.status_code in (200, 204), response.text
            data += response.content
            offset = response.headers["Stream-Next-Offset"]
            cursor = response.headers.get("Stream-Cursor")
            if response.headers.get("Stream-Closed") == "true":
                return data, offset


@pytest.mark.timeout(120)
async def test_long_poll_readers_following_burst_commits_get_every_message_once(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    """Readers long-polling at the tail are answered by the commits themselves, several
    messages at a time (and by their own tasks when a change is not the plain case, like the
    close); chained from offset to offset they must rebuild exactly the stream."""
    url = shared_server.url(unique_name("lp-follow"))
    create_stream(client, url, "text/plain")
    start = tail_offset(client, url)
    readies = [asyncio.Event() for _ in range(8)]
    readers = [asyncio.create_task(follow_long_poll(url, start, ready)) for ready in readies]
    await asyncio.wait_for(asyncio.gather(*(ready.wait() for ready in readies)), 30)

    # Bursts of appends sent at once on ten connections commit together, so a parked reader
    # is handed several messages by one commit; the pauses let the readers park again.
    target = url.removeprefix(shared_server.origin)
    connections = [
        await asyncio.open_connection("127.0.0.1", shared_server.port) for _ in range(10)
    ]
    try:
        for burst in range(12):
            for n, (_, out) in enumerate(connections):
                body = f"<{burst}.{n}>".encode()
                out.write(
                    f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            for incoming, _ in connections:
                head = await incoming.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 204"), head
            await asyncio.sleep(0.03)
    finally:
        for _, out in connections:
            out.close()
    async with httpx.AsyncClient(timeout=30) as http:
        final = await close_stream(http, url)
    stored, tail = read_all(client, url)
    assert tail == final and stored.count(b"<") == 120
    for data, last in await asyncio.gather(*readers):
        assert last == final
        assert data == stored

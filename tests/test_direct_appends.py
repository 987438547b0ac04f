"""Appends answered straight from the HTTP parser (http/direct.py), over raw sockets.

The direct path must be indistinguishable from the ASGI route on the wire: the same status,
headers and error envelope, one response per request in request order (also when a client
pipelines appends behind other requests), keep-alive and `Connection: close` honoured, and
nothing stored for a refused append. The same protocol serves every request, so the limit on
a request's head and the handling of half-closed connections are checked here too.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import httpx
import orjson
import pytest

from conftest import (
    ServerFactory,
    ServerProcess,
    create_stream,
    producer_headers,
    read_all,
    tail_offset,
    unique_name,
)
from electric_agents.http.direct import MAX_REQUEST_HEAD_BYTES

SOCKET_TIMEOUT_S = 10
TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}


class RawResponse:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.header_list = headers
        self.headers = {name: value for name, value in reversed(headers)}
        self.body = body


class RawConnection:
    """One keep-alive TCP connection that sends bytes as given and parses responses."""

    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), SOCKET_TIMEOUT_S)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self, *, head: bool = False) -> RawResponse:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-response: {self.buffer!r}"
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = [
            (name.strip().lower(), value.strip())
            for name, value in (line.split(":", 1) for line in lines)
        ]
        length = int(dict(headers).get("content-length", "0"))
        if head or status in (204, 304):
            length = 0
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return RawResponse(status, headers, body)

    def closed_by_server(self) -> bool:
        """True once the server has closed its side (recv returns EOF)."""
        self.sock.settimeout(SOCKET_TIMEOUT_S)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


def request(
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    all_headers = dict(headers or {})
    if body or method in ("POST", "PUT"):
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True)
class NewStream:
    url: str  # for httpx
    path: str  # the request target on a raw connection


def new_stream(
    server: ServerProcess,
    client: httpx.Client,
    content_type: str = "text/plain",
    body: bytes = b"",
) -> NewStream:
    name = unique_name()
    create_stream(client, server.url(name), content_type, body)
    return NewStream(server.url(name), f"{server.stream_prefix}/{name}")


@pytest.fixture
def raw(shared_server: ServerProcess):  # type: ignore[no-untyped-def]
    connections: list[RawConnection] = []

    def connect() -> RawConnection:
        connection = RawConnection(shared_server)
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()


def test_direct_append_has_the_protocol_headers(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    connection = raw()
    connection.send(request("POST", stream.path, body=b"hello", headers=TEXT))
    response = connection.response()
    assert response.status == 204
    assert response.body == b""
    assert response.headers["stream-next-offset"] == tail_offset(client, stream.url)
    # The headers every response carries (CORS, browser security), once each.
    names = [name for name, _ in response.header_list]
    for expected in (
        "access-control-allow-origin",
        "access-control-expose-headers",
        "x-content-type-options",
        "cross-origin-resource-policy",
        "date",
    ):
        assert names.count(expected) == 1, (expected, response.header_list)
    assert "content-length" not in names  # a 204 has no body and says nothing of one
    assert read_all(client, stream.url)[0] == b"hello"


def test_direct_producer_append_answers_200_with_producer_headers(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    connection = raw()
    path = stream.path
    for seq in (0, 1, 1):
        connection.send(
            request("POST", path, body=b"x", headers={**TEXT, **producer_headers("p", 3, seq)})
        )
    first, second, duplicate = (connection.response() for _ in range(3))
    assert (first.status, first.headers["producer-seq"]) == (200, "0")
    assert (second.status, second.headers["producer-seq"]) == (200, "1")
    assert (duplicate.status, duplicate.headers["producer-epoch"]) == (204, "3")
    assert read_all(client, stream.url)[0] == b"xx"


def test_direct_error_is_the_same_envelope_as_the_asgi_route(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A POST to a missing stream (direct path) and a GET of it (ASGI) fail alike."""
    missing = f"{shared_server.stream_prefix}/{unique_name('missing')}"
    connection = raw()
    connection.send(request("POST", missing, body=b"x", headers=TEXT))
    direct = connection.response()
    connection.send(request("GET", missing))
    routed = connection.response()
    assert direct.status == routed.status == 404
    assert orjson.loads(direct.body) == orjson.loads(routed.body)
    assert orjson.loads(direct.body)["error"]["code"] == "STREAM_NOT_FOUND"
    assert direct.headers["content-type"] == routed.headers["content-type"]
    assert direct.headers["content-length"] == str(len(direct.body))
    assert {n for n, _ in direct.header_list} == {n for n, _ in routed.header_list}


def test_refused_appends_store_nothing_and_keep_the_connection(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client, "application/json", b'{"a":1}')
    url, path = stream.url, stream.path
    before = read_all(client, url)
    connection = raw()
    cases = [
        (request("POST", path, body=b"{bad", headers=JSON), 400, "INVALID_JSON"),
        (request("POST", path, body=b"[]", headers=JSON), 400, "EMPTY_JSON_ARRAY"),
        (request("POST", path, body=b"", headers=JSON), 400, "EMPTY_BODY"),
        (request("POST", path, body=b"{}"), 400, "MISSING_CONTENT_TYPE"),
        (request("POST", path, body=b"x", headers=TEXT), 409, "CONTENT_TYPE_MISMATCH"),
        (
            request("POST", path, body=b"{}", headers={**JSON, "Producer-Id": "p"}),
            400,
            None,
        ),
    ]
    for raw_request, status, code in cases:
        connection.send(raw_request)
        response = connection.response()
        assert response.status == status, (raw_request, response.body)
        if code is not None:
            assert orjson.loads(response.body)["error"]["code"] == code
    assert read_all(client, url) == before
    # The same connection still appends.
    connection.send(request("POST", path, body=b'{"b":2}', headers=JSON))
    assert connection.response().status == 204


def test_pipelined_requests_are_answered_in_order(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """Appends pipelined behind each other and behind a read: one response each, in order,
    and the appends stored in the order sent."""
    stream = new_stream(shared_server, client)
    url, path = stream.url, stream.path
    batch = b"".join(
        [
            request("POST", path, body=b"a", headers=TEXT),
            request("POST", path, body=b"b", headers=TEXT),
            request("GET", f"{path}?offset=-1"),
            request("POST", path, body=b"c", headers=TEXT),
            request("HEAD", path),
            request("POST", path, body=b"d", headers=TEXT),
        ]
    )
    connection = raw()
    connection.send(batch)
    statuses = []
    offsets = []
    for index in range(6):
        response = connection.response(head=index == 4)
        statuses.append(response.status)
        offsets.append(response.headers.get("stream-next-offset"))
        if index == 2:
            assert response.body == b"ab"  # both earlier appends, in order
    assert statuses == [204, 204, 200, 204, 200, 204]
    append_offsets = [offsets[0], offsets[1], offsets[3], offsets[5]]
    assert append_offsets == sorted(append_offsets) and len(set(append_offsets)) == 4
    assert offsets[4] == offsets[3]  # HEAD saw the append before it
    assert read_all(client, url)[0] == b"abcd"


def test_chunked_request_body_is_appended_whole(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    head = (
        f"POST {stream.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    connection = raw()
    connection.send(head + b"3\r\nabc\r\n")
    time.sleep(0.05)  # the rest arrives in a later packet
    connection.send(b"4\r\ndefg\r\n0\r\n\r\n")
    assert connection.response().status == 204
    assert read_all(client, stream.url)[0] == b"abcdefg"


def test_http_1_0_and_connection_close_are_honoured(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    path = stream.path
    old = raw()
    old.send(request("POST", path, body=b"1", headers=TEXT, version="HTTP/1.0"))
    response = old.response()
    assert response.status == 204
    assert response.headers.get("connection") == "close"
    assert old.closed_by_server()
    closing = raw()
    closing.send(request("POST", path, body=b"2", headers={**TEXT, "Connection": "close"}))
    response = closing.response()
    assert response.status == 204
    assert response.headers.get("connection") == "close"
    assert closing.closed_by_server()
    assert read_all(client, stream.url)[0] == b"12"


def test_expect_100_continue_goes_through_the_asgi_route(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    connection = raw()
    connection.send(
        request(
            "POST",
            stream.path,
            headers={**TEXT, "Content-Length": "3", "Expect": "100-continue"},
        )
    )
    assert connection.response().status == 100
    connection.send(b"abc")
    assert connection.response().status == 204
    assert read_all(client, stream.url)[0] == b"abc"


def test_client_gone_before_the_commit_leaves_the_server_serving(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    """Connections that send an append and hang up at once: each append is stored whole or
    not at all, and the server keeps answering."""
    stream = new_stream(shared_server, client)
    url, path = stream.url, stream.path
    for _ in range(20):
        connection = RawConnection(shared_server)
        connection.send(request("POST", path, body=b"z" * 10, headers=TEXT))
        connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
        connection.close()  # RST, not a graceful close
    # Appends already queued still commit; wait until the stream stops changing.
    data, _ = read_all(client, url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.3)
        latest, _ = read_all(client, url)
        if latest == data:
            break
        data = latest
    assert len(data) % 10 == 0 and set(data) <= {ord("z")}
    assert client.post(url, content=b"ok", headers=TEXT).status_code == 204
    assert read_all(client, url)[0] == data + b"ok"


def test_oversized_append_is_413_and_stores_nothing(server_factory: ServerFactory) -> None:
    server = server_factory("streams", extra_args=["--max-append-bytes", "1024"])
    with httpx.Client(timeout=30) as http:
        stream = new_stream(server, http, body=b"seed")
        connection = RawConnection(server)
        try:
            path = stream.path
            connection.send(request("POST", path, body=b"y" * 5000, headers=TEXT))
            response = connection.response()
            assert response.status == 413
            assert orjson.loads(response.body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
            # Refused as soon as the limit is passed, before the whole body has arrived; the
            # rest is read and dropped, and the connection stays usable.
            head = request("POST", path, body=b"z" * 5000, headers=TEXT)[:-5000]
            connection.send(head + b"z" * 2000)
            response = connection.response()
            assert response.status == 413
            connection.send(b"z" * 3000)
            # A producer header error still comes first (spec/01 §A.5 steps 1-4).
            bad_producer = {**TEXT, "Producer-Id": "p", "Producer-Epoch": "x", "Producer-Seq": "0"}
            connection.send(request("POST", path, body=b"y" * 5000, headers=bad_producer))
            response = connection.response()
            assert response.status == 400, response.body
            # Exactly the limit is fine, on the same connection.
            connection.send(request("POST", path, body=b"y" * 1024, headers=TEXT))
            assert connection.response().status == 204
        finally:
            connection.close()
        assert read_all(http, stream.url)[0] == b"seed" + b"y" * 1024


def test_appends_outside_the_stream_mount_are_not_appends(
    shared_server: ServerProcess, raw
) -> None:
    """`streams` serves streams under /v1/stream only; a POST elsewhere, or to the
    subscription API, is routed as before."""
    connection = raw()
    connection.send(request("POST", "/elsewhere/s1", body=b"x", headers=TEXT))
    assert connection.response().status == 404
    connection.send(request("POST", "/_electric/health", body=b"x", headers=TEXT))
    assert connection.response().status == 404
    connection.send(request("POST", "/v1/stream/__ds/subscriptions", body=b"{}", headers=JSON))
    response = connection.response()
    # The subscription API's own answer, not a stream append to a missing stream.
    assert response.status == 404, response.body
    assert orjson.loads(response.body)["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


def refused_head(connection: RawConnection, data: bytes) -> RawResponse:
    """Send `data`, whose head is too large; the 431 must arrive and the server close."""
    connection.send(data)
    response = connection.response()
    assert response.status == 431, response.body
    assert response.headers["connection"] == "close"
    assert orjson.loads(response.body)["error"]["code"] == "REQUEST_HEADERS_TOO_LARGE"
    assert connection.closed_by_server()
    return response


def test_request_head_over_the_limit_is_431_and_stores_nothing(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A request line plus headers over the limit is refused, whether the bytes are in one
    header, in many headers or in the URL, on the direct route and the ASGI route alike."""
    stream = new_stream(shared_server, client, body=b"seed")
    big = "v" * (MAX_REQUEST_HEAD_BYTES + 1024)
    many = {f"X-Filler-{i}": "w" * 100 for i in range(MAX_REQUEST_HEAD_BYTES // 100)}
    refused_head(raw(), request("POST", stream.path, body=b"x", headers={**TEXT, "X-Big": big}))
    refused_head(raw(), request("POST", stream.path, body=b"x", headers={**TEXT, **many}))
    refused_head(raw(), request("GET", f"{stream.path}?offset=-1&pad={big}"))
    refused_head(raw(), request("PUT", stream.path + "-new", headers={**TEXT, "X-Big": big}))
    assert read_all(client, stream.url)[0] == b"seed"
    assert client.head(stream.url + "-new").status_code == 404


def test_request_head_under_the_limit_is_served(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A large head under the limit is fine, and so is a large body after a small head
    (the body does not count against the head, even when both arrive together)."""
    stream = new_stream(shared_server, client)
    connection = raw()
    near = "v" * (MAX_REQUEST_HEAD_BYTES - 2048)
    connection.send(request("POST", stream.path, body=b"a", headers={**TEXT, "X-Big": near}))
    assert connection.response().status == 204
    body = b"b" * (4 * MAX_REQUEST_HEAD_BYTES)
    connection.send(request("POST", stream.path, body=body, headers=TEXT))
    assert connection.response().status == 204
    assert read_all(client, stream.url)[0] == b"a" + body


def test_huge_head_is_refused_early_and_the_answer_survives(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A client still sending megabytes of header gets the 431: the server stops buffering
    at the limit and drains the rest instead of resetting the connection under the
    response."""
    stream = new_stream(shared_server, client, body=b"seed")
    head = request("POST", stream.path, body=b"x", headers={**TEXT, "X-Big": "v" * (8 << 20)})
    refused_head(raw(), head)
    assert read_all(client, stream.url)[0] == b"seed"


def test_half_closed_connection_is_answered_then_closed(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A client that shuts down its sending side after its request (as HTTP/1.0 tools do)
    still gets the response, on the direct and the ASGI route, and then the server closes."""
    stream = new_stream(shared_server, client)
    for data, status in [
        (request("POST", stream.path, body=b"hc", headers=TEXT), 204),
        (request("GET", f"{stream.path}?offset=-1"), 200),
    ]:
        connection = raw()
        connection.send(data)
        connection.sock.shutdown(socket.SHUT_WR)
        response = connection.response()
        assert response.status == status
        assert connection.closed_by_server()
    assert read_all(client, stream.url)[0] == b"hc"


# --- Long-poll answered from the commit ---------------------------------------------------
# A long-poll parked at the tail is answered by the commit that brings the next messages,
# in one write, instead of by its own task through the ASGI send. It must be the same answer.

# Long enough for a long-poll sent on loopback to be parked at the tail before the append.
PARK_S = 0.3


def long_poll(path: str, offset: str, headers: dict[str, str] | None = None) -> bytes:
    return request("GET", f"{path}?offset={offset}&live=long-poll", headers=headers)


def test_long_poll_answered_by_the_commit_is_the_answer_a_read_gives(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client, "application/json")
    start = tail_offset(client, stream.url)
    parked = raw()
    parked.send(long_poll(stream.path, start))
    time.sleep(PARK_S)
    posted = client.post(stream.url, content=b'[{"a":1},{"b":"two"}]', headers=JSON)
    assert posted.status_code == 204
    from_commit = parked.response()
    # The same request now finds the messages stored and is answered by its own task.
    later = raw()
    later.send(long_poll(stream.path, start))
    from_read = later.response()
    assert from_commit.status == from_read.status == 200
    assert orjson.loads(from_commit.body) == [{"a": 1}, {"b": "two"}]
    assert from_commit.body == from_read.body
    assert [n for n, _ in from_commit.header_list] == [n for n, _ in from_read.header_list]
    for name, value in from_read.header_list:
        if name not in ("date", "stream-cursor"):
            assert from_commit.headers[name] == value, name
    assert from_commit.headers["stream-next-offset"] == posted.headers["Stream-Next-Offset"]
    assert from_commit.headers["stream-up-to-date"] == "true"
    assert from_commit.headers["stream-cursor"].isdigit()
    # The connection goes on serving.
    parked.send(request("HEAD", stream.path))
    assert (
        parked.response(head=True).headers["stream-next-offset"]
        == posted.headers["Stream-Next-Offset"]
    )


def test_request_pipelined_behind_a_parked_long_poll_is_answered_after_it(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    start = tail_offset(client, stream.url)
    connection = raw()
    connection.send(long_poll(stream.path, start) + request("HEAD", stream.path))
    time.sleep(PARK_S)
    tail = client.post(stream.url, content=b"news", headers=TEXT).headers["Stream-Next-Offset"]
    answer, head = connection.response(), connection.response(head=True)
    assert (answer.status, answer.body) == (200, b"news")
    assert head.status == 200 and head.headers["stream-next-offset"] == tail
    connection.send(long_poll(stream.path, start))
    assert connection.response().body == b"news"


def test_parked_long_poll_with_connection_close_is_answered_then_closed(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    connection = raw()
    connection.send(
        long_poll(stream.path, tail_offset(client, stream.url), {"Connection": "close"})
    )
    time.sleep(PARK_S)
    client.post(stream.url, content=b"bye", headers=TEXT)
    answer = connection.response()
    assert (answer.status, answer.body) == (200, b"bye")
    assert answer.headers["connection"] == "close"
    assert connection.closed_by_server()


def test_one_commit_answers_every_parked_long_poll_and_skips_a_gone_client(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    stream = new_stream(shared_server, client)
    start = tail_offset(client, stream.url)
    parked = [raw() for _ in range(20)]
    gone = raw()
    for connection in [*parked, gone]:
        connection.send(long_poll(stream.path, start))
    time.sleep(PARK_S)
    gone.close()
    time.sleep(0.05)
    tail = client.post(stream.url, content=b"all", headers=TEXT).headers["Stream-Next-Offset"]
    for connection in parked:
        answer = connection.response()
        assert (answer.status, answer.body) == (200, b"all")
        assert answer.headers["stream-next-offset"] == tail
    assert client.post(stream.url, content=b"+", headers=TEXT).status_code == 204
    assert read_all(client, stream.url)[0] == b"all+"


def test_parked_long_poll_sees_a_closing_append_as_the_final_answer(
    shared_server: ServerProcess, client: httpx.Client, raw
) -> None:
    """A change that closes the stream is not the commit's to answer; the reader's own task
    answers it, with the closed marker and no cursor."""
    stream = new_stream(shared_server, client)
    connection = raw()
    connection.send(long_poll(stream.path, tail_offset(client, stream.url)))
    time.sleep(PARK_S)
    closing = client.post(stream.url, content=b"the end", headers={**TEXT, "Stream-Closed": "true"})
    assert closing.status_code == 204
    answer = connection.response()
    assert (answer.status, answer.body) == (200, b"the end")
    assert answer.headers["stream-closed"] == "true"
    assert "stream-cursor" not in answer.headers

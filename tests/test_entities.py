"""Entities over HTTP (spec/02 §3.4, spec/03 §5.2, §5.3, §5.16) against a real
`electric-agents serve` process and its PostgreSQL: spawn, read, list, send, inbox edits and
principal entities. Entity types are registered through `POST /_electric/entity-types`;
statuses no route reaches yet are set directly in the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agents_support import (
    TENANT,
    module_serve_server,
    read_events,
    set_status,
    status_of,
    unique_id,
)
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

DEV_PRINCIPAL_URL = "/principal/system%3Adev-local"
JSON_UTF8 = "application/json; charset=utf-8"
PUBLIC_KEYS = [
    "url",
    "type",
    "status",
    "streams",
    "dispatch_policy",
    "tags",
    "spawn_args",
    "parent",
    "created_by",
    "created_at",
    "updated_at",
]
WEBHOOK_POLICY = {"targets": [{"type": "webhook", "url": "http://127.0.0.1:9/hook"}]}
CREATION_SCHEMA = {
    "type": "object",
    "properties": {"model": {"type": "string"}, "temperature": {"type": "number"}},
    "required": ["model"],
}
GREETING_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("entities"))


# --- helpers -------------------------------------------------------------------------------


class Api:
    """The control plane of one server, spoken to over HTTP."""

    def __init__(self, http: httpx.AsyncClient, server: ServerProcess) -> None:
        self.http = http
        self.server = server

    def url(self, path: str) -> str:
        return self.server.origin + path

    async def register_type(self, **fields: Any) -> str:
        name = fields.pop("name", None) or unique_id("t").replace("-", "_")
        body = {"name": name, "description": "a test type", **fields}
        response = await self.http.post(self.url("/_electric/entity-types"), json=body)
        assert response.status_code == 201, response.text
        return name

    async def spawn(self, url: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.http.put(
            self.url(f"/_electric/entities{url}"), json=body if body is not None else {}, **kwargs
        )

    async def spawned(self, url: str, body: Any = None) -> dict[str, Any]:
        response = await self.spawn(url, body)
        assert response.status_code == 201, response.text
        payload: dict[str, Any] = response.json()
        return payload

    async def get(self, url: str) -> httpx.Response:
        return await self.http.get(self.url(f"/_electric/entities{url}"))

    async def send(self, url: str, body: Any, **kwargs: Any) -> httpx.Response:
        return await self.http.post(self.url(f"/_electric/entities{url}/send"), json=body, **kwargs)

    async def events(self, stream: str) -> list[Any]:
        return await read_events(self.http, self.server, stream)

    async def inbox(self, url: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(url + "/main") if e.get("type") == "inbox"]


@pytest.fixture
def api(http: httpx.AsyncClient, server: ServerProcess, db: Any) -> Api:
    return Api(http, server)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == JSON_UTF8
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


async def row_exists(db: Any, url: str) -> bool:
    found = await db.fetchval(
        "SELECT 1 FROM entities WHERE tenant_id = $1 AND url = $2", TENANT, url
    )
    return found is not None


async def stream_exists(api: Api, path: str) -> bool:
    response = await api.http.head(api.url(path))
    assert response.status_code in (200, 404), response.status_code
    return response.status_code == 200


# --- spawn -----------------------------------------------------------------------------------


async def test_spawn_returns_the_public_entity_and_starts_the_main_stream(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    response = await api.spawn(url, {"args": {"topic": "x"}, "tags": {"b": "2", "a": "1"}})
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == JSON_UTF8
    assert response.headers["x-write-token"]
    body = response.json()
    assert isinstance(body.pop("txid"), int)
    assert list(body) == [k for k in PUBLIC_KEYS if k in body]
    assert "write_token" not in body and "subscription_id" not in body
    assert body["url"] == url and body["type"] == kind and body["status"] == "idle"
    assert body["streams"] == {"main": url + "/main", "error": url + "/error"}
    assert body["tags"] == {"b": "2", "a": "1"}
    assert body["spawn_args"] == {"topic": "x"}
    assert body["created_by"] == DEV_PRINCIPAL_URL
    assert isinstance(body["created_at"], int) and body["created_at"] == body["updated_at"]

    got = (await api.get(url)).json()
    assert got == {**body, "tags": {"a": "1", "b": "2"}}
    assert await stream_exists(api, url + "/main") and await stream_exists(api, url + "/error")
    [created] = await api.events(url + "/main")
    assert created["type"] == "entity_created" and created["key"] == "entity-created"
    assert created["value"]["entity_type"] == kind
    assert created["value"]["args"] == {"topic": "x"}
    assert created["value"]["timestamp"].endswith("Z")
    assert "parent_url" not in created["value"]
    assert created["headers"]["operation"] == "insert"
    assert await api.events(url + "/error") == []


async def test_spawn_without_args_omits_spawn_args_but_get_shows_an_empty_object(
    api: Api,
) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    body = await api.spawned(url)
    assert "spawn_args" not in body and body["tags"] == {}
    assert (await api.get(url)).json()["spawn_args"] == {}
    [created] = await api.events(url + "/main")
    assert created["value"]["args"] == {}


async def test_spawn_refuses_unknown_types_principals_and_reserved_names(api: Api) -> None:
    error_of(await api.spawn(f"/nosuchtype/{unique_id()}"), 404, "UNKNOWN_ENTITY_TYPE")
    error = error_of(await api.spawn("/principal/user%3Aalice"), 400, "INVALID_REQUEST")
    assert error["message"] == "Principal entities are built in and cannot be spawned directly"
    error_of(await api.spawn("/_hidden/x"), 400, "INVALID_REQUEST")
    kind = await api.register_type()
    error_of(await api.spawn(f"/{kind}/a*b"), 400, "INVALID_REQUEST")


async def test_respawn_is_409_and_concurrent_spawns_create_each_url_once(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    error = error_of(await api.spawn(url), 409, "DUPLICATE_URL")
    assert error["message"] == f'Entity already exists at URL "{url}"'

    contested = f"/{kind}/{unique_id()}"
    same = await asyncio.gather(*(api.spawn(contested) for _ in range(8)))
    assert sorted(r.status_code for r in same) == [201] + [409] * 7
    distinct = await asyncio.gather(*(api.spawn(f"/{kind}/{unique_id()}") for _ in range(5)))
    assert [r.status_code for r in distinct] == [201] * 5
    assert len(await api.events(contested + "/main")) == 1


async def test_spawn_args_are_checked_against_the_creation_schema_only_when_given(
    api: Api,
) -> None:
    kind = await api.register_type(creation_schema=CREATION_SCHEMA)
    bad = await api.spawn(f"/{kind}/{unique_id()}", {"args": {"temperature": "hot"}})
    error = error_of(bad, 422, "SCHEMA_VALIDATION_FAILED")
    assert error["message"] == "Validation failed"
    paths = {detail["path"] for detail in error["details"]}
    assert paths == {"/", "/temperature"}, error["details"]
    await api.spawned(f"/{kind}/{unique_id()}", {"args": {"model": "m", "temperature": 0.5}})
    await api.spawned(f"/{kind}/{unique_id()}")  # no args: not validated


async def test_tags_must_be_strings_and_parents_must_exist(api: Api) -> None:
    kind = await api.register_type()
    error_of(
        await api.spawn(f"/{kind}/{unique_id()}", {"tags": {"wrong": 123}}), 400, "INVALID_REQUEST"
    )
    missing = f"/{kind}/nobody"
    error = error_of(
        await api.spawn(f"/{kind}/{unique_id()}", {"parent": missing}), 404, "NOT_FOUND"
    )
    assert error["message"] == f'Parent entity "{missing}" not found'
    parent = f"/{kind}/{unique_id()}"
    await api.spawned(parent)
    child = f"/{kind}/{unique_id()}"
    assert (await api.spawned(child, {"parent": parent}))["parent"] == parent
    [created] = await api.events(child + "/main")
    assert created["value"]["parent_url"] == parent
    listed = (await api.http.get(api.url("/_electric/entities"), params={"parent": parent})).json()
    assert [e["url"] for e in listed] == [child]


async def test_dispatch_policy_is_explicit_else_the_parents_else_the_types_default(
    api: Api,
) -> None:
    scoped_default = {
        "targets": [
            {"type": "webhook", "url": "http://127.0.0.1:9/hook", "subscription_id": "webhook:t"}
        ]
    }
    kind = await api.register_type(default_dispatch_policy=scoped_default)
    plain = await api.register_type()
    other = {"targets": [{"type": "webhook", "url": "http://127.0.0.1:9/other"}]}

    assert (await api.spawned(f"/{kind}/{unique_id()}"))["dispatch_policy"] == scoped_default
    explicit = await api.spawned(f"/{kind}/{unique_id()}", {"dispatch_policy": other})
    assert explicit["dispatch_policy"] == other
    assert "dispatch_policy" not in await api.spawned(f"/{plain}/{unique_id()}")

    # A child inherits its parent's target; the type's default subscription id applies when
    # the default points at the same place.
    parent = f"/{plain}/{unique_id()}"
    await api.spawned(parent, {"dispatch_policy": WEBHOOK_POLICY})
    child = await api.spawned(f"/{kind}/{unique_id()}", {"parent": parent})
    assert child["dispatch_policy"] == scoped_default
    elsewhere = f"/{plain}/{unique_id()}"
    await api.spawned(elsewhere, {"dispatch_policy": other})
    assert (await api.spawned(f"/{kind}/{unique_id()}", {"parent": elsewhere}))[
        "dispatch_policy"
    ] == other

    bad_policy = {"targets": [{"type": "webhook", "url": ""}]}
    response = await api.spawn(f"/{plain}/{unique_id()}", {"dispatch_policy": bad_policy})
    error_of(response, 400, "INVALID_REQUEST")


async def test_runner_dispatch_needs_an_existing_runner_owned_by_the_caller(
    api: Api, db: Any
) -> None:
    kind = await api.register_type()
    runner_id = unique_id("runner")

    def policy(runner: str) -> dict[str, Any]:
        return {"dispatch_policy": {"targets": [{"type": "runner", "runnerId": runner}]}}

    error = error_of(await api.spawn(f"/{kind}/{unique_id()}", policy(runner_id)), 404, "NOT_FOUND")
    assert error["message"] == f'Runner "{runner_id}" not found'
    await db.execute(
        """
        INSERT INTO runners (tenant_id, id, owner_principal, label, wake_stream)
        VALUES ($1, $2, '/principal/user%3Asomeone-else', 'r', $3)
        """,
        TENANT,
        runner_id,
        f"/runners/{runner_id}/wake",
    )
    response = await api.spawn(f"/{kind}/{unique_id()}", policy(runner_id))
    error_of(response, 403, "UNAUTHORIZED")
    await db.execute(
        "UPDATE runners SET owner_principal = $2 WHERE id = $1", runner_id, DEV_PRINCIPAL_URL
    )
    await api.spawned(f"/{kind}/{unique_id()}", policy(runner_id))


async def test_initial_message_is_sent_from_the_caller_in_the_spawn(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url, {"initialMessage": {"text": "hello"}})
    created, message = await api.events(url + "/main")
    assert created["type"] == "entity_created"
    assert message["type"] == "inbox" and message["headers"] == {
        "operation": "insert",
        "offset": message["headers"]["offset"],
    }
    assert message["value"]["from"] == DEV_PRINCIPAL_URL
    assert message["value"]["payload"] == {"text": "hello"}
    assert message["value"]["status"] == "processed"


async def test_spawn_is_one_transaction(api: Api, db: Any) -> None:
    """A spawn that fails at any step leaves no row, no streams and no wake registration."""
    kind = await api.register_type(inbox_schemas={"greeting": GREETING_SCHEMA})
    subscriber = f"/{kind}/{unique_id()}"
    await api.spawned(subscriber)
    wake = {"subscriberUrl": subscriber, "condition": "runFinished", "manifestKey": "child:x"}

    # The typed initial message fails its inbox schema after the row and streams were made.
    url = f"/{kind}/{unique_id()}"
    response = await api.spawn(
        url,
        {"initialMessage": {"text": 5}, "initialMessageType": "greeting", "wake": wake},
    )
    error_of(response, 422, "SCHEMA_VALIDATION_FAILED")
    assert not await row_exists(db, url)
    assert not await stream_exists(api, url + "/main")
    assert not await stream_exists(api, url + "/error")
    assert (
        await db.fetchval("SELECT count(*) FROM wake_registrations WHERE source_url = $1", url) == 0
    )
    error_of(await api.get(url), 404, "NOT_FOUND")

    # A stream already at the main path (made through the raw stream API) is a duplicate.
    taken = f"/{kind}/{unique_id()}"
    put = await api.http.put(api.url(taken + "/main"), headers={"Content-Type": "text/plain"})
    assert put.status_code == 201
    error_of(await api.spawn(taken), 409, "DUPLICATE_URL")
    assert not await row_exists(db, taken)
    assert not await stream_exists(api, taken + "/error")

    # The same spawn, valid, commits all of it.
    ok = await api.spawn(
        url,
        {"initialMessage": {"text": "hi"}, "initialMessageType": "greeting", "wake": wake},
    )
    assert ok.status_code == 201, ok.text
    rows = await db.fetch(
        "SELECT subscriber_url, condition, manifest_key, include_response FROM wake_registrations"
        " WHERE source_url = $1",
        url,
    )
    assert [(r["subscriber_url"], r["manifest_key"], r["include_response"]) for r in rows] == [
        (subscriber, "child:x", True)
    ]
    [message] = await api.inbox(url)
    assert message["value"]["message_type"] == "greeting"


async def test_txid_is_the_spawn_transaction(api: Api, db: Any) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    body = await api.spawned(url)
    xmin = await db.fetchval(
        "SELECT xmin::text::bigint FROM entities WHERE tenant_id = $1 AND url = $2", TENANT, url
    )
    assert body["txid"] == xmin


# --- principals ------------------------------------------------------------------------------


async def test_spawn_creates_the_callers_principal_entity_with_its_identity(api: Api) -> None:
    kind = await api.register_type()
    headers = {"electric-principal": "user:alice@example.com"}
    response = await api.spawn(f"/{kind}/{unique_id()}", {}, headers=headers)
    assert response.status_code == 201, response.text
    principal_url = "/principal/user%3Aalice%40example.com"
    assert response.json()["created_by"] == principal_url
    entity = (await api.get(principal_url)).json()
    assert entity["type"] == "principal" and entity["created_by"] == principal_url
    assert entity["tags"] == {"principal_id": "alice@example.com", "principal_kind": "user"}
    assert entity["spawn_args"] == {
        "kind": "user",
        "id": "alice@example.com",
        "key": "user:alice@example.com",
    }
    created, identity = await api.events(principal_url + "/main")
    assert created["type"] == "entity_created"
    assert identity == {
        "type": "identity",
        "key": "self",
        "value": {
            "kind": "user",
            "id": "alice@example.com",
            "key": "user:alice@example.com",
            "url": principal_url,
            "created_at": identity["value"]["created_at"],
            "updated_at": identity["value"]["created_at"],
        },
    }


async def test_principal_entities_materialise_on_first_mention(api: Api) -> None:
    key = f"user:{unique_id()}"
    responses = await asyncio.gather(*(api.get(f"/principal/{key}") for _ in range(5)))
    assert {r.status_code for r in responses} == {200}
    url = responses[0].json()["url"]
    assert url == "/principal/" + key.replace(":", "%3A")
    assert len(await api.events(url + "/main")) == 2
    error_of(await api.get("/principal/not-a-key"), 400, "INVALID_REQUEST")


async def test_principal_entities_refuse_tags_but_take_sends(api: Api) -> None:
    url = "/principal/user%3Acarol"
    response = await api.http.post(api.url(f"/_electric/entities{url}/tags/x"), json={"value": "1"})
    error = error_of(response, 400, "INVALID_REQUEST")
    assert error["message"] == "Principal entities are built in and cannot be tagged"
    assert (await api.send(url, {"payload": "hi"})).status_code == 204


async def test_only_system_principals_update_identity(api: Api) -> None:
    url = "/principal/user%3Adave"
    identity = {
        "kind": "user",
        "id": "dave",
        "key": "user:dave",
        "url": url,
        "updated_at": "2026-01-01T00:00:00.000Z",
        "display_name": "Dave",
    }
    body = {"type": "update_identity", "payload": {"identity": identity}}
    as_user = await api.send(url, body, headers={"electric-principal": "user:eve"})
    error_of(as_user, 403, "UNAUTHORIZED")
    assert (await api.send(url, body)).status_code == 204  # dev principal: built-in system
    *_, message, updated = await api.events(url + "/main")
    assert message["type"] == "inbox" and message["value"]["message_type"] == "update_identity"
    assert updated == {"type": "identity", "key": "self", "value": identity}
    invalid = {"type": "update_identity", "payload": {"identity": {"kind": "user"}}}
    error_of(await api.send(url, invalid), 422, "SCHEMA_VALIDATION_FAILED")


# --- reading and listing ----------------------------------------------------------------------


async def test_missing_entities_are_404_with_the_right_code(api: Api) -> None:
    kind = await api.register_type()
    error = error_of(await api.get(f"/{kind}/nope"), 404, "NOT_FOUND")
    assert error["message"] == f"Entity not found at /{kind}/nope"
    error = error_of(await api.get("/unregistered/nope"), 404, "UNKNOWN_ENTITY_TYPE")
    assert error["message"] == 'Entity type "unregistered" not found'
    head = await api.http.head(api.url(f"/_electric/entities/{kind}/nope"))
    assert head.status_code == 404 and head.content == b""
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    head = await api.http.head(api.url(f"/_electric/entities{url}"))
    assert head.status_code == 200 and head.content == b""
    error_of(await api.get("/_reserved/x"), 404, "NOT_FOUND")
    error_of(await api.get(f"/{kind}/a*"), 404, "NOT_FOUND")


async def test_list_filters_by_type_status_parent_and_creator_newest_first(
    api: Api, db: Any
) -> None:
    kind = await api.register_type()
    urls = [f"/{kind}/{unique_id()}" for _ in range(3)]
    for url in urls:
        await api.spawned(url)
        await asyncio.sleep(0.005)  # distinct created_at
    await set_status(db, urls[1], "paused")

    async def listed(**params: str) -> list[str]:
        response = await api.http.get(api.url("/_electric/entities/"), params=params)
        assert response.status_code == 200
        return [entity["url"] for entity in response.json()]

    assert await listed(type=kind) == urls[::-1]
    assert await listed(type=kind, status="paused") == [urls[1]]
    assert await listed(type=kind, status="idle") == [urls[2], urls[0]]
    assert await listed(type=kind, created_by=DEV_PRINCIPAL_URL) == urls[::-1]
    assert await listed(type=kind, created_by="/principal/user%3Anobody") == []
    everything = await listed()
    assert set(urls) <= set(everything) and DEV_PRINCIPAL_URL in everything


# --- send -------------------------------------------------------------------------------------


async def test_sends_append_inbox_events_from_the_caller_in_order(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    for n in range(5):
        assert (await api.send(url, {"payload": {"n": n}})).status_code == 204
    messages = await api.inbox(url)
    assert [m["value"]["payload"] for m in messages] == [{"n": n} for n in range(5)]
    first = messages[0]
    assert first["key"].startswith("msg-in-")
    assert list(first["value"]) == [
        "from",
        "payload",
        "timestamp",
        "mode",
        "status",
        "processed_at",
    ]
    assert first["value"]["from"] == DEV_PRINCIPAL_URL
    assert first["value"]["mode"] == "immediate" and first["value"]["status"] == "processed"
    assert first["value"]["processed_at"] == first["value"]["timestamp"]
    assert first["headers"]["operation"] == "insert"
    assert len({m["key"] for m in messages}) == 5


async def test_send_checks_from_and_payload(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    error = error_of(
        await api.send(url, {"payload": 1, "from": "/principal/user%3Ax"}), 400, "INVALID_REQUEST"
    )
    assert error["message"] == "Request from must match Electric-Principal"
    assert (await api.send(url, {"payload": 1, "from": DEV_PRINCIPAL_URL})).status_code == 204
    error = error_of(await api.send(url, {}), 400, "INVALID_REQUEST")
    assert error["message"] == "Missing required field: payload"
    assert (await api.send(url, {"payload": None})).status_code == 204
    error_of(await api.send(f"/{kind}/nobody", {"payload": 1}), 404, "NOT_FOUND")
    error_of(await api.send("/unregistered/x", {"payload": 1}), 404, "UNKNOWN_ENTITY_TYPE")


async def test_typed_sends_follow_the_inbox_schemas(api: Api) -> None:
    kind = await api.register_type(inbox_schemas={"greeting": GREETING_SCHEMA})
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    error = error_of(
        await api.send(url, {"type": "other", "payload": {}}), 422, "UNKNOWN_MESSAGE_TYPE"
    )
    assert error["message"] == 'Unknown message type "other"'
    error = error_of(
        await api.send(url, {"type": "greeting", "payload": {"text": 1}}),
        422,
        "SCHEMA_VALIDATION_FAILED",
    )
    assert error["details"] == [{"path": "/text", "message": "must be string"}]
    assert (await api.send(url, {"type": "greeting", "payload": {"text": "hi"}})).status_code == 204
    assert (await api.send(url, {"payload": {"anything": True}})).status_code == 204  # untyped
    messages = await api.inbox(url)
    assert [m["value"].get("message_type") for m in messages] == ["greeting", None]


async def test_an_empty_inbox_schema_map_rejects_every_typed_send(api: Api) -> None:
    empty = await api.register_type(inbox_schemas={})
    none = await api.register_type()
    empty_url, none_url = f"/{empty}/{unique_id()}", f"/{none}/{unique_id()}"
    await api.spawned(empty_url)
    await api.spawned(none_url)
    error_of(await api.send(empty_url, {"type": "x", "payload": 1}), 422, "UNKNOWN_MESSAGE_TYPE")
    assert (await api.send(empty_url, {"payload": 1})).status_code == 204
    assert (await api.send(none_url, {"type": "x", "payload": 1})).status_code == 204


async def test_queued_messages_wait_with_a_time_ordered_position(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    await api.send(url, {"payload": 1, "mode": "queued", "key": "q1"})
    await api.send(url, {"payload": 2, "mode": "steer", "position": "p"})
    queued, steer = await api.inbox(url)
    assert queued["key"] == "q1"
    assert queued["value"]["status"] == "pending" and "processed_at" not in queued["value"]
    millis, suffix = queued["value"]["position"].split(":")
    assert len(millis) == 16 and suffix == "a0"
    assert steer["value"]["status"] == "processed" and steer["value"]["position"] == "p"


async def test_a_send_resumes_a_paused_entity_unless_it_is_paused_mode(api: Api, db: Any) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    await set_status(db, url, "paused")
    assert (await api.send(url, {"payload": 1, "mode": "paused"})).status_code == 204
    assert await status_of(db, url) == "paused"
    assert (await api.send(url, {"payload": 2})).status_code == 204
    assert await status_of(db, url) == "idle"


@pytest.mark.parametrize("status", ["stopping", "stopped", "killed"])
async def test_entities_not_accepting_writes_refuse_sends_and_inbox_edits(
    api: Api, db: Any, status: str
) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    await set_status(db, url, status)
    error = error_of(await api.send(url, {"payload": 1}), 409, "NOT_RUNNING")
    assert error["message"] == "Entity is not accepting writes"
    error_of(await api.send(url, {"payload": 1, "afterMs": 1000}), 409, "NOT_RUNNING")
    inbox_url = api.url(f"/_electric/entities{url}/inbox/k")
    error_of(await api.http.patch(inbox_url, json={"status": "processed"}), 409, "NOT_RUNNING")
    error_of(await api.http.delete(inbox_url), 409, "NOT_RUNNING")
    assert await api.inbox(url) == []


async def test_a_killed_entity_refuses_sends(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    assert (await api.send(url, {"payload": "before"})).status_code == 204
    killed = await api.http.post(
        api.url(f"/_electric/entities{url}/signal"), json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    error_of(await api.send(url, {"payload": "after"}), 409, "NOT_RUNNING")
    assert [m["value"]["payload"] for m in await api.inbox(url)] == ["before"]


async def test_a_delayed_send_is_checked_now_and_queued_for_the_scheduler(
    api: Api, db: Any
) -> None:
    kind = await api.register_type(inbox_schemas={"greeting": GREETING_SCHEMA})
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    bad = {"type": "greeting", "payload": {"text": 1}, "afterMs": 60_000}
    error_of(await api.send(url, bad), 422, "SCHEMA_VALIDATION_FAILED")
    good = {"type": "greeting", "payload": {"text": "later"}, "afterMs": 60_000, "mode": "queued"}
    assert (await api.send(url, good)).status_code == 204
    assert await api.inbox(url) == []
    row = await db.fetchrow(
        "SELECT kind, payload::text, fire_at - created_at AS delay FROM scheduled_tasks"
        " WHERE payload->>'entityUrl' = $1",
        url,
    )
    assert row["kind"] == "delayed_send"
    import json

    assert json.loads(row["payload"]) == {
        "entityUrl": url,
        "from": DEV_PRINCIPAL_URL,
        "payload": {"text": "later"},
        "type": "greeting",
        "mode": "queued",
    }
    assert 59 <= row["delay"].total_seconds() <= 61
    error_of(await api.send(url, {"payload": 1, "afterMs": 1e300}), 400, "INVALID_REQUEST")


async def test_send_gives_an_entity_its_types_default_dispatch_policy(api: Api, db: Any) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    await db.execute(
        "UPDATE entity_types SET default_dispatch_policy = $2::jsonb WHERE name = $1",
        kind,
        '{"targets":[{"type":"webhook","url":"http://127.0.0.1:9/hook"}]}',
    )
    assert "dispatch_policy" not in (await api.get(url)).json()
    assert (await api.send(url, {"payload": 1})).status_code == 204
    assert (await api.get(url)).json()["dispatch_policy"] == WEBHOOK_POLICY


# --- inbox edits ------------------------------------------------------------------------------


async def test_inbox_patch_appends_a_partial_update_and_delete_a_delete(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    base = api.url(f"/_electric/entities{url}/inbox")
    processed = await api.http.patch(f"{base}/m%201", json={"status": "processed", "position": "z"})
    assert processed.status_code == 204, processed.text
    nulled = await api.http.patch(f"{base}/m2", json={"payload": None, "status": "cancelled"})
    assert nulled.status_code == 204
    error = error_of(await api.http.patch(f"{base}/m3", json={}), 400, "INVALID_REQUEST")
    assert error["message"] == "No inbox fields to update"
    assert (await api.http.delete(f"{base}/m2")).status_code == 204
    first, second, deleted = await api.inbox(url)
    assert first["key"] == "m 1" and first["headers"]["operation"] == "update"
    assert set(first["value"]) == {"position", "status", "processed_at"}
    assert second["value"]["payload"] is None and "cancelled_at" in second["value"]
    assert deleted == {
        "type": "inbox",
        "key": "m2",
        "headers": {**deleted["headers"], "operation": "delete"},
    }
    assert "value" not in deleted
    error_of(await api.http.patch(f"{base}/x", json={"mode": "later"}), 400, "INVALID_REQUEST")


# --- malformed input ---------------------------------------------------------------------------


async def test_malformed_requests_are_400_envelopes_never_500(api: Api) -> None:
    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    await api.spawned(url)
    entity = api.url(f"/_electric/entities{url}")
    fresh = api.url(f"/_electric/entities/{kind}/{unique_id()}")
    cases: list[tuple[str, str, bytes]] = [
        ("PUT", fresh, b"{not json"),
        ("PUT", fresh, b"[]"),
        ("PUT", fresh, b'{"args": "x"}'),
        ("PUT", fresh, b'{"parent": 5}'),
        ("PUT", fresh, b'{"dispatch_policy": {"targets": []}}'),
        ("PUT", fresh, b'{"wake": {"subscriberUrl": "/a/b"}}'),
        ("PUT", fresh, b'{"wake": {"subscriberUrl": "/a/b", "condition": "sometimes"}}'),
        (
            "PUT",
            fresh,
            b'{"wake": {"subscriberUrl": "/a/b", "condition": "runFinished", "debounceMs": 1e20}}',
        ),
        ("PUT", fresh, b'{"initialMessage": 1, "initialMessageType": 7}'),
        ("POST", entity + "/send", b"nope"),
        ("POST", entity + "/send", b'"text"'),
        ("POST", entity + "/send", b'{"payload": 1, "mode": "sometime"}'),
        ("POST", entity + "/send", b'{"payload": 1, "afterMs": "soon"}'),
        ("POST", entity + "/send", b'{"payload": 1, "key": 3}'),
        ("PATCH", entity + "/inbox/k", b"{"),
        ("PATCH", entity + "/inbox/k", b'{"status": "done"}'),
        ("POST", entity + "/tags/k", b"{}"),
        ("POST", entity + "/tags/k", b'{"value": 1}'),
    ]
    for method, target, body in cases:
        response = await api.http.request(method, target, content=body)
        error_of(response, 400, "INVALID_REQUEST")
    assert not await row_exists_via_api(api, fresh)


async def test_nul_characters_postgres_cannot_store_are_400_and_store_nothing(
    api: Api,
) -> None:
    """Postgres text and jsonb cannot hold "\\u0000": such a request is the client's 400
    (the write's transaction rolls back), never a 500."""

    def nul_error(response: httpx.Response, status: int, code: str) -> None:
        assert "NUL" in error_of(response, status, code)["message"]

    kind = await api.register_type()
    url = f"/{kind}/{unique_id()}"
    nul = "a\u0000b"
    nul_error(await api.spawn(url, {"tags": {"k": nul}}), 400, "INVALID_REQUEST")
    nul_error(await api.spawn(url, {"args": {"q": nul}}), 400, "INVALID_REQUEST")
    assert (await api.get(url)).status_code == 404
    assert not await stream_exists(api, url + "/main")
    name = unique_id("t").replace("-", "_")
    body = {"name": name, "description": nul}
    response = await api.http.post(api.url("/_electric/entity-types"), json=body)
    nul_error(response, 400, "INVALID_REQUEST")
    assert (await api.http.get(api.url(f"/_electric/entity-types/{name}"))).status_code == 404
    response = await api.http.post(
        api.url("/_electric/entities/register"), json={"tags": {"k": nul}}
    )
    nul_error(response, 400, "INVALID_REQUEST")
    # The same entity spawns once the text is storable.
    await api.spawned(url, {"tags": {"k": "ab"}})


async def row_exists_via_api(api: Api, entity_api_url: str) -> bool:
    return (await api.http.get(entity_api_url)).status_code == 200

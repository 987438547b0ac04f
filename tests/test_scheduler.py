"""The scheduler over HTTP (spec/02 §3.2 `cron/register`, §3.4 `send` with `afterMs` and
`schedules`, §4.12; spec/03 §5.7, §5.8) against real `electric-agents serve` processes:
delayed sends, future sends, cron schedules and sources, and exactly-once firing across two
processes and across a kill -9."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import (
    TENANT,
    eventually,
    mint_token,
    module_serve_server,
    new_type,
    read_events,
    set_status,
    spawn_entity,
    unique_id,
)
from conftest import ServerFactory, ServerProcess
from electric_agents.agents.cron import cron_stream_url

pytestmark = pytest.mark.timeout(120)

DEV_PRINCIPAL_URL = "/principal/system%3Adev-local"
EVERY_SECOND = "*/1 * * * * *"


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("scheduler"))


class Api:
    def __init__(self, http: httpx.AsyncClient, server: ServerProcess) -> None:
        self.http = http
        self.server = server

    def url(self, path: str) -> str:
        return self.server.origin + path

    async def entity(self) -> str:
        kind = await new_type(self.http, self.server, "t")
        url: str = (await spawn_entity(self.http, self.server, kind))["url"]
        return url

    async def send(self, url: str, body: Any) -> httpx.Response:
        return await self.http.post(self.url(f"/_electric/entities{url}/send"), json=body)

    async def put_schedule(self, url: str, schedule_id: str, body: Any) -> httpx.Response:
        return await self.http.put(
            self.url(f"/_electric/entities{url}/schedules/{schedule_id}"), json=body
        )

    async def delete_schedule(self, url: str, schedule_id: str) -> httpx.Response:
        return await self.http.delete(self.url(f"/_electric/entities{url}/schedules/{schedule_id}"))

    async def events(self, stream: str) -> list[Any]:
        return await read_events(self.http, self.server, stream)

    async def inbox(self, url: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(url + "/main") if e.get("type") == "inbox"]

    async def manifests(self, url: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(url + "/main") if e.get("type") == "manifest"]


@pytest.fixture
def api(http: httpx.AsyncClient, server: ServerProcess, db: Any) -> Api:
    return Api(http, server)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


async def inbox_keys(api: Api, url: str) -> list[str]:
    return [event["key"] for event in await api.inbox(url)]


async def wait_for_keys(api: Api, url: str, keys: set[str]) -> list[str]:
    async def arrived() -> bool:
        return keys <= set(await inbox_keys(api, url))

    await eventually(arrived, f"inbox keys {sorted(keys)} on {url}")
    return await inbox_keys(api, url)


def iso_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


# --- delayed sends ----------------------------------------------------------------------------


async def test_after_ms_send_fires_once_on_time_keeping_mode_and_position(api: Api) -> None:
    url = await api.entity()
    sent_at = time.monotonic()
    body = {
        "payload": {"n": 1},
        "key": "later",
        "mode": "queued",
        "position": "p-1",
        "afterMs": 200,
    }
    response = await api.send(url, body)
    assert response.status_code == 204, response.text
    assert "later" not in await inbox_keys(api, url)  # not before its time
    await wait_for_keys(api, url, {"later"})
    elapsed = time.monotonic() - sent_at
    assert 0.2 <= elapsed < 3.0, elapsed  # woken by the insert, not by the 5 s poll
    [message] = [e for e in await api.inbox(url) if e["key"] == "later"]
    value = message["value"]
    assert value["payload"] == {"n": 1}
    assert value["from"] == DEV_PRINCIPAL_URL
    # The reference dropped these at fire time (quirk 8); they are kept here.
    assert value["mode"] == "queued"
    assert value["position"] == "p-1"
    assert value["status"] == "pending"
    # A later delayed send arriving proves the scheduler moved on without a second copy.
    await api.send(url, {"payload": 2, "key": "marker", "afterMs": 100})
    keys = await wait_for_keys(api, url, {"marker"})
    assert keys.count("later") == 1


async def test_after_ms_send_without_key_uses_the_task_key(api: Api, db: Any) -> None:
    url = await api.entity()
    assert (await api.send(url, {"payload": "x", "afterMs": 50})).status_code == 204
    task_id = await db.fetchval(
        "SELECT id FROM scheduled_tasks WHERE payload->>'entityUrl' = $1", url
    )

    async def arrived() -> bool:
        return f"scheduled-task-{task_id}" in await inbox_keys(api, url)

    await eventually(arrived, "the delayed send")
    row = await db.fetchrow(
        "SELECT completed_at, last_error FROM scheduled_tasks WHERE id = $1", task_id
    )
    assert row["completed_at"] is not None and row["last_error"] is None


async def test_after_ms_send_to_an_entity_stopped_meanwhile_fails_for_good(
    api: Api, db: Any
) -> None:
    url = await api.entity()
    assert (await api.send(url, {"payload": "x", "afterMs": 1500})).status_code == 204
    await set_status(db, url, "stopped")

    async def settled() -> bool:
        error = await db.fetchval(
            "SELECT last_error FROM scheduled_tasks"
            " WHERE payload->>'entityUrl' = $1 AND completed_at IS NOT NULL",
            url,
        )
        return error is not None

    await eventually(settled, "the failed delayed send")
    error = await db.fetchval(
        "SELECT last_error FROM scheduled_tasks WHERE payload->>'entityUrl' = $1", url
    )
    assert "NOT_RUNNING" in error
    assert await inbox_keys(api, url) == []


async def test_after_ms_send_is_validated_when_sent(api: Api) -> None:
    url = await api.entity()
    error_of(await api.send(url, {"afterMs": 100}), 400, "INVALID_REQUEST")
    error_of(await api.send("/nope/x", {"payload": 1, "afterMs": 100}), 404, "UNKNOWN_ENTITY_TYPE")


# --- future sends -------------------------------------------------------------------------------


async def test_future_send_schedule_fires_and_settles_its_manifest_to_sent(api: Api) -> None:
    owner = await api.entity()
    target = await api.entity()
    body = {
        "scheduleType": "future_send",
        "payload": {"remind": True},
        "fireAt": iso_in(0.3),
        "targetUrl": target,
        "messageType": "reminder",
    }
    response = await api.put_schedule(owner, "remind", body)
    assert response.status_code == 200, response.text
    txid = response.json()["txid"]
    assert str(uuid.UUID(txid)) == txid
    [upsert] = await api.manifests(owner)
    assert list(upsert) == ["type", "key", "headers", "value"]
    assert upsert["key"] == "schedule:remind"
    assert upsert["headers"]["operation"] == "upsert"
    assert upsert["headers"]["txid"] == txid
    entry = upsert["value"]
    assert entry["scheduleType"] == "future_send"
    assert entry["status"] == "pending"
    assert entry["targetUrl"] == target
    assert entry["senderUrl"] == DEV_PRINCIPAL_URL
    assert entry["messageType"] == "reminder"
    producer_id = entry["producerId"]
    assert producer_id.startswith("future-send-")

    await wait_for_keys(api, target, {f"scheduled-{producer_id}"})
    [message] = await api.inbox(target)
    assert message["value"]["payload"] == {"remind": True}
    assert message["value"]["message_type"] == "reminder"

    async def settled() -> bool:
        return len(await api.manifests(owner)) == 2

    await eventually(settled, "the sent manifest update")
    update = (await api.manifests(owner))[1]
    assert update["headers"]["operation"] == "update"
    assert update["value"]["status"] == "sent"
    assert "sentAt" in update["value"]


async def test_reupserting_a_future_send_replaces_the_pending_one(api: Api, db: Any) -> None:
    owner = await api.entity()
    first = {"scheduleType": "future_send", "payload": "old", "fireAt": iso_in(2.0)}
    second = {"scheduleType": "future_send", "payload": "new", "fireAt": iso_in(0.3)}
    assert (await api.put_schedule(owner, "s", first)).status_code == 200
    assert (await api.put_schedule(owner, "s", second)).status_code == 200
    superseded = await db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE owner_entity_url = $1"
        " AND completed_at < fire_at AND payload->>'payload' = 'old'",
        owner,
    )
    assert superseded == 1
    # A marker due after the replaced send would have fired.
    assert (await api.send(owner, {"payload": "m", "key": "marker", "afterMs": 2200})).is_success
    await wait_for_keys(api, owner, {"marker"})
    payloads = [e["value"]["payload"] for e in await api.inbox(owner)]
    assert payloads == ["new", "m"]


async def test_delete_schedule_cancels_a_pending_future_send(api: Api, db: Any) -> None:
    owner = await api.entity()
    body = {"scheduleType": "future_send", "payload": "never", "fireAt": iso_in(1.5)}
    assert (await api.put_schedule(owner, "gone", body)).status_code == 200
    response = await api.delete_schedule(owner, "gone")
    assert response.status_code == 200, response.text
    txid = response.json()["txid"]
    cancelled_in_time = await db.fetchval(
        "SELECT bool_and(completed_at < fire_at) FROM scheduled_tasks WHERE owner_entity_url = $1",
        owner,
    )
    assert cancelled_in_time
    assert (await api.send(owner, {"payload": "m", "key": "marker", "afterMs": 1500})).is_success
    await wait_for_keys(api, owner, {"marker"})
    assert await inbox_keys(api, owner) == ["marker"]
    manifests = await api.manifests(owner)
    assert [m["headers"]["operation"] for m in manifests] == ["upsert", "delete"]
    delete = manifests[1]
    assert list(delete) == ["type", "key", "headers"]
    assert delete["key"] == "schedule:gone"
    assert delete["headers"]["txid"] == txid
    # Idempotent: an unknown schedule is no 404.
    assert (await api.delete_schedule(owner, "never-was")).status_code == 200


async def test_future_send_bad_input_is_4xx(api: Api) -> None:
    owner = await api.entity()
    base = {"scheduleType": "future_send", "payload": 1, "fireAt": iso_in(60)}
    error = error_of(
        await api.put_schedule(owner, "s", {**base, "fireAt": "soon"}), 400, "INVALID_REQUEST"
    )
    assert error["message"] == "Invalid fireAt timestamp: soon"
    error = error_of(
        await api.put_schedule(owner, "s", {**base, "from": "/principal/user%3Aeve"}),
        400,
        "INVALID_REQUEST",
    )
    assert error["message"] == "Request from must match Electric-Principal"
    error_of(await api.put_schedule(owner, "s", {**base, "targetUrl": "/x/y"}), 404, "NOT_FOUND")
    error_of(
        await api.put_schedule(owner, "s", {"scheduleType": "future_send", "payload": 1}),
        400,
        "INVALID_REQUEST",
    )
    error_of(await api.put_schedule(owner, "s", {"scheduleType": "weekly"}), 400, "INVALID_REQUEST")
    error_of(await api.put_schedule("/nope/x", "s", base), 404, "UNKNOWN_ENTITY_TYPE")
    error_of(
        await api.put_schedule(DEV_PRINCIPAL_URL.replace("%3A", ":"), "s", base),
        400,
        "INVALID_REQUEST",
    )
    assert await api.manifests(owner) == []


# --- cron -------------------------------------------------------------------------------------


async def test_cron_schedule_registers_a_wake_and_its_stream_ticks(api: Api, db: Any) -> None:
    owner = await api.entity()
    body = {
        "scheduleType": "cron",
        "expression": EVERY_SECOND,
        "timezone": "utc",
        "payload": {"job": "tick"},
        "debounceMs": 10,
    }
    response = await api.put_schedule(owner, "heartbeat", body)
    assert response.status_code == 200, response.text
    stream = cron_stream_url(EVERY_SECOND, "UTC")
    [upsert] = await api.manifests(owner)
    assert upsert["value"] == {
        "key": "schedule:heartbeat",
        "kind": "schedule",
        "id": "heartbeat",
        "scheduleType": "cron",
        "expression": EVERY_SECOND,
        "timezone": "UTC",
        "payload": {"job": "tick"},
        "wake": {"on": "change", "debounceMs": 10},
    }
    registration = await db.fetchrow(
        "SELECT source_url, condition, debounce_ms FROM wake_registrations"
        " WHERE tenant_id = $1 AND subscriber_url = $2 AND manifest_key = $3",
        TENANT,
        owner,
        "schedule:heartbeat",
    )
    assert registration["source_url"] == stream
    assert orjson.loads(registration["condition"]) == {"on": "change"}
    assert registration["debounce_ms"] == 10

    async def two_ticks() -> bool:
        return len(await api.events(stream)) >= 2

    await eventually(two_ticks, "two cron ticks")
    ticks = await api.events(stream)
    numbers = [t["value"]["tickNumber"] for t in ticks]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))  # no gap, no repeat
    tick = ticks[0]
    assert list(tick) == ["type", "key", "value", "headers"]
    assert tick["type"] == "cron_tick"
    assert tick["key"] == f"tick-{tick['value']['tickNumber']}"
    assert list(tick["value"]) == ["expression", "timezone", "firedAt", "tickNumber"]
    assert tick["value"]["expression"] == EVERY_SECOND
    assert tick["value"]["timezone"] == "UTC"
    assert tick["headers"]["operation"] == "insert"
    assert tick["headers"]["timestamp"] == tick["value"]["firedAt"]

    # Each tick wakes the owner (debounced by 10 ms) with the tick as the change.
    async def woken() -> bool:
        return any(e.get("type") == "wake" for e in await api.events(f"{owner}/main"))

    await eventually(woken, "a wake from a cron tick")
    wake = next(e for e in await api.events(f"{owner}/main") if e.get("type") == "wake")
    assert wake["value"]["source"] == stream
    assert {change["collection"] for change in wake["value"]["changes"]} == {"cron_tick"}

    # Deleting the schedule removes its registration.
    assert (await api.delete_schedule(owner, "heartbeat")).status_code == 200
    left = await db.fetchval(
        "SELECT count(*) FROM wake_registrations WHERE subscriber_url = $1", owner
    )
    assert left == 0


async def test_cron_register_answers_the_stream_url_and_creates_the_stream(
    api: Api, http: httpx.AsyncClient
) -> None:
    expression = "0 0 1 1 *"
    response = await http.post(
        api.url("/_electric/cron/register"),
        json={"expression": expression, "timezone": "US/Eastern"},
    )
    assert response.status_code == 200, response.text
    stream = cron_stream_url(expression, "America/New_York")
    assert response.json() == {"streamUrl": stream}
    head = await http.head(api.url(stream))
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("application/json")
    again = await http.post(api.url("/_electric/cron/register"), json={"expression": expression})
    assert again.json() == {"streamUrl": cron_stream_url(expression, "UTC")}


async def test_invalid_cron_expression_or_timezone_is_400(
    api: Api, http: httpx.AsyncClient
) -> None:
    register = api.url("/_electric/cron/register")
    error = error_of(
        await http.post(register, json={"expression": "61 * * * *"}), 400, "INVALID_REQUEST"
    )
    assert error["message"] == 'Invalid cron expression: "61 * * * *"'
    error = error_of(
        await http.post(register, json={"expression": "* * * * *", "timezone": "Mars/Base"}),
        400,
        "INVALID_REQUEST",
    )
    assert error["message"] == 'Invalid cron timezone: "Mars/Base"'
    error_of(await http.post(register, json={"expression": 5}), 400, "INVALID_REQUEST")
    error_of(await http.post(register, content=b"{nope"), 400, "INVALID_REQUEST")
    error = error_of(await http.post(register, json={}), 400, "INVALID_REQUEST")
    assert error["details"] == [
        {"path": "/", "message": "must have required property 'expression'"}
    ]
    owner = await api.entity()
    bad = {"scheduleType": "cron", "expression": "nope", "payload": 1}
    error_of(await api.put_schedule(owner, "c", bad), 400, "INVALID_REQUEST")
    missing_payload = {"scheduleType": "cron", "expression": "* * * * *"}
    error_of(await api.put_schedule(owner, "c", missing_payload), 400, "INVALID_REQUEST")
    assert await api.manifests(owner) == []


async def test_an_unwatched_cron_chain_stops_and_registering_restarts_it(
    api: Api, http: httpx.AsyncClient, db: Any
) -> None:
    expression = "*/1 * * * * *"
    zone = "Europe/Berlin"
    register = api.url("/_electric/cron/register")
    response = await http.post(register, json={"expression": expression, "timezone": zone})
    assert response.status_code == 200

    async def stopped() -> bool:
        # Nobody watches it, and (as far as the chain knows) it was registered long ago;
        # said again on every poll, since a tick firing meanwhile copies its own payload.
        await db.execute(
            "UPDATE scheduled_tasks SET payload = payload || '{\"registeredAtMs\": 0}'::jsonb"
            " WHERE cron_expression = $1 AND cron_timezone = $2 AND completed_at IS NULL",
            expression,
            zone,
        )
        pending = await db.fetchval(
            "SELECT count(*) FROM scheduled_tasks WHERE cron_expression = $1"
            " AND cron_timezone = $2 AND completed_at IS NULL",
            expression,
            zone,
        )
        return pending == 0

    await eventually(stopped, "the unwatched chain to stop")
    last_error = await db.fetchval(
        "SELECT last_error FROM scheduled_tasks WHERE cron_expression = $1 AND cron_timezone = $2"
        " ORDER BY cron_tick_number DESC LIMIT 1",
        expression,
        zone,
    )
    assert "no watchers" in last_error
    stream = cron_stream_url(expression, zone)
    ticked_before = len(await api.events(stream))
    assert (await http.post(register, json={"expression": expression, "timezone": zone})).is_success

    async def ticking() -> bool:
        return len(await api.events(stream)) > ticked_before

    await eventually(ticking, "the restarted chain to tick")


# --- several processes, crashes ----------------------------------------------------------------


async def _spawned(http: httpx.AsyncClient, server: ServerProcess) -> str:
    type_name = unique_id("t").replace("-", "_")
    response = await http.post(
        f"{server.origin}/_electric/entity-types", json={"name": type_name, "description": "t"}
    )
    assert response.status_code == 201, response.text
    url = f"/{type_name}/{unique_id()}"
    response = await http.put(f"{server.origin}/_electric/entities{url}", json={})
    assert response.status_code == 201, response.text
    return url


async def test_two_processes_on_one_database_fire_each_task_exactly_once(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    first = server_factory("serve")
    second = server_factory("serve", database_url=first.database_url)
    url = await _spawned(http, first)
    keys = [f"k{i}" for i in range(30)]
    sends = [
        http.post(
            f"{(first, second)[i % 2].origin}/_electric/entities{url}/send",
            json={"payload": i, "key": key, "afterMs": 300 + 10 * (i % 5)},
        )
        for i, key in enumerate(keys)
    ]
    assert all(r.status_code == 204 for r in await asyncio.gather(*sends))
    api = Api(http, first)
    await wait_for_keys(api, url, set(keys))
    # Everything due has fired; one more marker proves both schedulers are past them.
    await http.post(
        f"{second.origin}/_electric/entities{url}/send",
        json={"payload": "m", "key": "marker", "afterMs": 50},
    )
    found = await wait_for_keys(api, url, {"marker"})
    assert sorted(found) == sorted([*keys, "marker"])


async def test_a_task_due_while_the_server_is_killed_fires_once_after_restart(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    server = server_factory("serve")
    url = await _spawned(http, server)
    response = await http.post(
        f"{server.origin}/_electric/entities{url}/send",
        json={"payload": "late", "key": "late", "afterMs": 800},
    )
    assert response.status_code == 204
    server.kill9()
    await asyncio.sleep(1.0)  # let it fall due while nobody runs
    server.start()
    api = Api(http, server)
    await wait_for_keys(api, url, {"late"})
    await http.post(
        f"{server.origin}/_electric/entities{url}/send",
        json={"payload": "m", "key": "marker", "afterMs": 50},
    )
    found = await wait_for_keys(api, url, {"marker"})
    assert found == ["late", "marker"]


async def test_a_kill_in_the_middle_of_a_burst_fires_every_task_exactly_once(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    server = server_factory("serve")
    url = await _spawned(http, server)
    keys = [f"b{i}" for i in range(40)]
    sends = [
        http.post(
            f"{server.origin}/_electric/entities{url}/send",
            json={"payload": i, "key": key, "afterMs": 400},
        )
        for i, key in enumerate(keys)
    ]
    assert all(r.status_code == 204 for r in await asyncio.gather(*sends))
    api = Api(http, server)

    async def burst_started() -> bool:
        return bool(set(await inbox_keys(api, url)) & set(keys))

    await eventually(burst_started, "the burst to start firing")
    server.kill9()  # measured: a few of the 40 have fired by now, the rest have not
    server.start()
    await wait_for_keys(api, url, set(keys))
    await http.post(
        f"{server.origin}/_electric/entities{url}/send",
        json={"payload": "m", "key": "marker", "afterMs": 50},
    )
    found = await wait_for_keys(api, url, {"marker"})
    assert sorted(found) == sorted([*keys, "marker"])


# --- manifest entries written by handlers ------------------------------------------------------


async def append_as_handler(api: Api, db: Any, url: str, *events: Any) -> None:
    token = await mint_token(db, url)
    response = await api.http.post(
        api.url(f"{url}/main"),
        content=orjson.dumps(list(events)),
        headers={"Content-Type": "application/json", "electric-claim-token": token},
    )
    assert response.status_code in (200, 204), response.text


def manifest_entry(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "manifest", "key": key, "headers": {"operation": "upsert"}, "value": value}


async def test_a_pending_future_send_in_a_handler_manifest_is_scheduled_and_settled(
    api: Api, db: Any
) -> None:
    owner = await api.entity()
    target = await api.entity()
    entry = {
        "key": "schedule:nudge",
        "kind": "schedule",
        "id": "nudge",
        "scheduleType": "future_send",
        "fireAt": iso_in(0.2),
        "targetUrl": target,
        "payload": {"hello": "later"},
        "producerId": "future-send-handler-1",
        "status": "pending",
    }
    await append_as_handler(api, db, owner, manifest_entry("schedule:nudge", entry))
    await wait_for_keys(api, target, {"scheduled-future-send-handler-1"})
    [message] = await api.inbox(target)
    assert message["value"]["from"] == owner  # no senderUrl: the owner, as in the reference
    assert message["value"]["payload"] == {"hello": "later"}

    async def settled() -> bool:
        return any(m["value"].get("status") == "sent" for m in await api.manifests(owner))

    await eventually(settled, "the sent status update")


async def test_a_deleted_or_settled_manifest_entry_cancels_its_pending_send(
    api: Api, db: Any
) -> None:
    owner = await api.entity()
    entry = {
        "key": "schedule:x",
        "kind": "schedule",
        "id": "x",
        "scheduleType": "future_send",
        "fireAt": iso_in(2.0),
        "payload": "never",
        "producerId": "future-send-handler-2",
    }
    await append_as_handler(api, db, owner, manifest_entry("schedule:x", entry))

    async def scheduled() -> bool:
        pending = await db.fetchval(
            "SELECT count(*) FROM scheduled_tasks WHERE owner_entity_url = $1"
            " AND completed_at IS NULL",
            owner,
        )
        return pending == 1

    await eventually(scheduled, "the manifest send to be scheduled")
    delete = {"type": "manifest", "key": "schedule:x", "headers": {"operation": "delete"}}
    await append_as_handler(api, db, owner, delete)

    async def cancelled() -> bool:
        pending = await db.fetchval(
            "SELECT count(*) FROM scheduled_tasks WHERE owner_entity_url = $1"
            " AND completed_at IS NULL",
            owner,
        )
        return pending == 0

    await eventually(cancelled, "the manifest send to be cancelled")
    cancelled_in_time = await db.fetchval(
        "SELECT bool_and(completed_at < fire_at) FROM scheduled_tasks WHERE owner_entity_url = $1",
        owner,
    )
    assert cancelled_in_time
    assert (await api.send(owner, {"payload": "m", "key": "marker", "afterMs": 2000})).is_success
    await wait_for_keys(api, owner, {"marker"})
    assert await inbox_keys(api, owner) == ["marker"]


async def test_a_cron_source_in_a_handler_manifest_ensures_its_chain(
    api: Api, db: Any, http: httpx.AsyncClient
) -> None:
    owner = await api.entity()
    expression = "0 12 * * *"
    source = {
        "key": "source:cron:x",
        "kind": "source",
        "sourceType": "cron",
        "sourceRef": "x",
        "config": {"expression": expression, "timezone": "Asia/Kolkata"},
    }
    await append_as_handler(api, db, owner, manifest_entry("source:cron:x", source))
    stream = cron_stream_url(expression, "Asia/Calcutta")

    async def ensured() -> bool:
        return (await http.head(api.url(stream))).status_code == 200

    await eventually(ensured, "the cron stream")
    pending = await db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE cron_expression = $1 AND cron_timezone = $2"
        " AND completed_at IS NULL",
        expression,
        "Asia/Calcutta",
    )
    assert pending == 1


# --- failures ------------------------------------------------------------------------------------


async def test_a_failing_task_backs_off_instead_of_retrying_at_once(db: Any, api: Api) -> None:
    # A task the server cannot perform (no target in its payload) fails with a non-4xx
    # error, the kind that is retried.
    task_id = await db.fetchval(
        "INSERT INTO scheduled_tasks (tenant_id, kind, payload, fire_at)"
        " VALUES ($1, 'delayed_send', '{\"from\": \"/principal/system%3Adev-local\"}'::jsonb,"
        " now()) RETURNING id",
        TENANT,
    )

    async def attempted(times: int) -> bool:
        count = await db.fetchval(
            "SELECT attempt_count FROM scheduled_tasks WHERE id = $1", task_id
        )
        return count >= times

    await eventually(lambda: attempted(1), "the first attempt")
    row = await db.fetchrow(
        "SELECT attempt_count, completed_at, last_error,"
        " extract(epoch FROM retry_at - now()) AS wait_s FROM scheduled_tasks WHERE id = $1",
        task_id,
    )
    assert row["completed_at"] is None
    assert row["attempt_count"] == 1  # not re-claimed in a tight loop
    assert "KeyError" in row["last_error"]
    assert 0.3 < row["wait_s"] <= 1.0
    await eventually(lambda: attempted(2), "the second attempt")
    wait_s = await db.fetchval(
        "SELECT extract(epoch FROM retry_at - now()) FROM scheduled_tasks WHERE id = $1", task_id
    )
    assert 1.0 < wait_s <= 2.0  # doubled
    await db.execute("UPDATE scheduled_tasks SET completed_at = now() WHERE id = $1", task_id)


async def test_schedules_on_a_stopped_entity_are_409(api: Api, db: Any) -> None:
    owner = await api.entity()
    await set_status(db, owner, "stopped")
    body = {"scheduleType": "cron", "expression": "* * * * *", "payload": 1}
    error_of(await api.put_schedule(owner, "c", body), 409, "NOT_RUNNING")
    error_of(await api.delete_schedule(owner, "c"), 409, "NOT_RUNNING")
    registrations = await db.fetchval(
        "SELECT count(*) FROM wake_registrations WHERE subscriber_url = $1", owner
    )
    assert registrations == 0


async def test_an_overdue_cron_tick_fires_once_and_the_chain_resumes_from_now(
    api: Api, http: httpx.AsyncClient, db: Any
) -> None:
    expression = "*/7 * * * *"
    zone = "Pacific/Auckland"
    register = api.url("/_electric/cron/register")
    assert (await http.post(register, json={"expression": expression, "timezone": zone})).is_success
    # As if the servers had been down for a day: the pending tick is long overdue.
    await db.execute(
        "UPDATE scheduled_tasks SET fire_at = now() - interval '1 day'"
        " WHERE cron_expression = $1 AND cron_timezone = $2 AND completed_at IS NULL",
        expression,
        zone,
    )
    stream = cron_stream_url(expression, zone)

    async def ticked() -> bool:
        return len(await api.events(stream)) == 1

    await eventually(ticked, "the overdue tick")
    rows = await db.fetch(
        "SELECT cron_tick_number, fire_at > now() AS future, completed_at IS NULL AS pending"
        " FROM scheduled_tasks WHERE cron_expression = $1 AND cron_timezone = $2"
        " ORDER BY cron_tick_number",
        expression,
        zone,
    )
    assert [(r["cron_tick_number"], r["pending"], r["future"]) for r in rows] == [
        (0, False, False),
        (1, True, True),  # from now, not one of the day's missed ticks
    ]
    assert len(await api.events(stream)) == 1


async def test_two_processes_tick_a_cron_chain_once_per_due_time(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    first = server_factory("serve")
    second = server_factory("serve", database_url=first.database_url)
    owner = await _spawned(http, first)
    body = {"scheduleType": "cron", "expression": EVERY_SECOND, "payload": None}
    response = await http.put(
        f"{second.origin}/_electric/entities{owner}/schedules/beat", json=body
    )
    assert response.status_code == 200, response.text
    api = Api(http, first)
    stream = cron_stream_url(EVERY_SECOND, "UTC")

    async def ticks() -> bool:
        return len(await api.events(stream)) >= 4

    await eventually(ticks, "four ticks")
    first.kill9()  # the other process carries the chain on
    api = Api(http, second)
    count = len(await api.events(stream))

    async def more() -> bool:
        return len(await api.events(stream)) >= count + 2

    await eventually(more, "ticks after a kill -9")
    events = await api.events(stream)
    numbers = [event["value"]["tickNumber"] for event in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    fired = [event["value"]["firedAt"] for event in events]
    assert len(set(fired)) == len(fired)


async def test_concurrent_registrations_of_one_cron_make_one_chain(
    api: Api, http: httpx.AsyncClient, db: Any
) -> None:
    expression = "0 3 * * 1-5"
    register = api.url("/_electric/cron/register")
    zones = ["Europe/Paris", "europe/paris", "Europe/Paris"] * 4
    responses = await asyncio.gather(
        *(http.post(register, json={"expression": expression, "timezone": z}) for z in zones)
    )
    assert [r.status_code for r in responses] == [200] * len(zones)
    assert {r.json()["streamUrl"] for r in responses} == {
        cron_stream_url(expression, "Europe/Paris")
    }
    rows = await db.fetch(
        "SELECT cron_tick_number FROM scheduled_tasks WHERE cron_expression = $1",
        expression,
    )
    assert [r["cron_tick_number"] for r in rows] == [0]


async def test_startup_restarts_the_chain_of_a_watched_cron_stream(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    server = server_factory("serve")
    owner = await _spawned(http, server)
    body = {"scheduleType": "cron", "expression": "0 0 * * *", "payload": 1}
    response = await http.put(f"{server.origin}/_electric/entities{owner}/schedules/d", json=body)
    assert response.status_code == 200, response.text
    assert server.database_url is not None
    db = await asyncpg.connect(server.database_url)
    try:
        # The chain was lost (as a permanent failure ended it in the reference).
        await db.execute("UPDATE scheduled_tasks SET completed_at = now()")
        server.kill9()
        server.start()

        async def restarted() -> bool:
            pending = await db.fetchval(
                "SELECT cron_tick_number FROM scheduled_tasks WHERE completed_at IS NULL"
            )
            return pending == 1

        await eventually(restarted, "the chain to restart with tick 1")
    finally:
        await db.close()


async def test_reupserting_a_schedule_replaces_its_registration_and_kind(api: Api, db: Any) -> None:
    owner = await api.entity()
    hourly = {"scheduleType": "cron", "expression": "0 * * * *", "payload": 1}
    daily = {"scheduleType": "cron", "expression": "0 0 * * *", "payload": 2, "timeoutMs": 5}
    assert (await api.put_schedule(owner, "s", hourly)).status_code == 200
    assert (await api.put_schedule(owner, "s", daily)).status_code == 200

    async def registrations() -> list[tuple[str, int]]:
        rows = await db.fetch(
            "SELECT source_url, timeout_ms FROM wake_registrations WHERE subscriber_url = $1",
            owner,
        )
        return [(row["source_url"], row["timeout_ms"]) for row in rows]

    assert await registrations() == [(cron_stream_url("0 0 * * *", "UTC"), 5)]
    later = {"scheduleType": "future_send", "payload": 3, "fireAt": iso_in(3600)}
    assert (await api.put_schedule(owner, "s", later)).status_code == 200
    assert await registrations() == []
    pending = await db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE owner_entity_url = $1 AND completed_at IS NULL",
        owner,
    )
    assert pending == 1
    assert (await api.put_schedule(owner, "s", hourly)).status_code == 200
    pending = await db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE owner_entity_url = $1 AND completed_at IS NULL",
        owner,
    )
    assert pending == 0  # the cron schedule replaced the pending send
    operations = [m["headers"]["operation"] for m in await api.manifests(owner)]
    assert operations == ["upsert"] * 4

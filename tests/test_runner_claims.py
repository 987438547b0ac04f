"""Runner pull-wake (spec/02 §3.5 claim, §4.2 runner targets, §4.7 pull-wake consumers,
§4.9; spec/03 §5.13-5.14) over HTTP against a real `electric-agents serve` and its
PostgreSQL.

The runner here does what the TypeScript runtime's runner does: it tails its wake stream
through the server, posts each wake event to the claim route, claims through the
notification's `callback` with the claim token, writes to the entity's main stream with the
write token, heartbeats, and reports done.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import TENANT, attach_log, module_serve_server, unique_id
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

ALICE = {"electric-principal": "user:alice"}
BOB = {"electric-principal": "user:bob"}
ALICE_URL = "/principal/user%3Aalice"
WAIT_S = 10.0


class _AnyOffset:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 33 and other[16] == "_"


ANY_OFFSET: Any = _AnyOffset()


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("runner_claims"))


@pytest.fixture
async def http(
    server: ServerProcess, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    attach_log(request, server)
    async with httpx.AsyncClient(base_url=server.origin, timeout=30.0, trust_env=False) as client:
        yield client


def sha16(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the runner's side of the protocol ------------------------------------------------------


class Runner:
    """A runner owned by alice, with a cursor on its wake stream."""

    def __init__(self, http: httpx.AsyncClient, runner_id: str) -> None:
        self.http = http
        self.id = runner_id
        self.offset = "-1"
        self._unread: list[dict[str, Any]] = []

    @property
    def wake_stream(self) -> str:
        return f"/runners/{self.id}/wake"

    async def next_wake_event(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """The next event of the wake stream, read through the server as a runner does."""
        deadline = time.monotonic() + timeout_s
        while not self._unread:
            if time.monotonic() > deadline:
                raise AssertionError(f"no wake event on {self.wake_stream}")
            response = await self.http.get(self.wake_stream, params={"offset": self.offset})
            assert response.status_code == 200, response.text
            self._unread.extend(response.json())
            self.offset = response.headers["Stream-Next-Offset"]
            if not self._unread:
                await asyncio.sleep(0.05)
        return self._unread.pop(0)

    async def claim(
        self, body: dict[str, Any] | None = None, headers: dict[str, str] = ALICE
    ) -> httpx.Response:
        return await self.http.post(
            f"/_electric/runners/{self.id}/claim",
            content=orjson.dumps(body if body is not None else {}),
            headers={"content-type": "application/json", **headers},
        )


async def register_runner(http: httpx.AsyncClient) -> Runner:
    runner_id = unique_id("r")
    response = await http.post(
        "/_electric/runners", json={"id": runner_id, "label": "laptop"}, headers=ALICE
    )
    assert response.status_code == 201, response.text
    return Runner(http, runner_id)


async def runner_type(http: httpx.AsyncClient, runner: Runner) -> str:
    name = unique_id("pulled")
    response = await http.post(
        "/_electric/entity-types",
        json={
            "name": name,
            "description": "dispatched to a runner",
            "default_dispatch_policy": {"targets": [{"type": "runner", "runnerId": runner.id}]},
        },
        headers=ALICE,
    )
    assert response.status_code == 201, response.text
    return name


async def spawn(http: httpx.AsyncClient, type_name: str) -> str:
    response = await http.put(f"/_electric/entities/{type_name}/{unique_id()}", headers=ALICE)
    assert response.status_code == 201, response.text
    url: str = response.json()["url"]
    return url


async def send(http: httpx.AsyncClient, url: str, text: str) -> None:
    response = await http.post(
        f"/_electric/entities{url}/send", json={"payload": {"text": text}}, headers=ALICE
    )
    assert response.status_code == 204, response.text


async def entity_status(http: httpx.AsyncClient, url: str) -> str:
    response = await http.get(f"/_electric/entities{url}", headers=ALICE)
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


async def dispatched_entity(http: httpx.AsyncClient) -> tuple[Runner, str]:
    """A runner, and an entity of a type dispatched to it."""
    runner = await register_runner(http)
    url = await spawn(http, await runner_type(http, runner))
    return runner, url


async def woken(http: httpx.AsyncClient) -> tuple[Runner, str, dict[str, Any]]:
    """A runner whose entity got a message: the runner, the entity, the wake event."""
    runner, url = await dispatched_entity(http)
    await send(http, url, "hello")
    return runner, url, await runner.next_wake_event()


async def callback(
    http: httpx.AsyncClient, notification: dict[str, Any], body: dict[str, Any], token: str | None
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return await http.post(notification["callback"], json=body, headers=headers)


async def claim_row(db: asyncpg.Connection, consumer_id: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT * FROM consumer_claims WHERE tenant_id = $1 AND consumer_id = $2",
        TENANT,
        consumer_id,
    )
    assert row is not None, consumer_id
    return row


async def dispatch_state(db: asyncpg.Connection, url: str) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT * FROM entity_dispatch_state WHERE tenant_id = $1 AND entity_url = $2",
        TENANT,
        url,
    )
    assert row is not None, url
    return row


def assert_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"error": {"code": code, "message": message}}


# --- the full cycle -------------------------------------------------------------------------


async def test_pull_wake_cycle_send_wake_event_claim_write_heartbeat_done(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner, url = await dispatched_entity(http)
    # Spawning links the main stream at its tail: `entity_created` wakes nobody.
    assert (await http.get(runner.wake_stream, params={"offset": "-1"})).json() == []
    await send(http, url, "hello")

    event = await runner.next_wake_event()
    subscription_id = f"runner:{runner.id}:{sha16(url)}"
    assert event == {
        "type": "wake",
        "subscription_id": subscription_id,
        "stream": f"{url.lstrip('/')}/main",
        "generation": 1,
        "ts": event["ts"],
    }
    assert isinstance(event["ts"], int) and abs(event["ts"] / 1000 - time.time()) < 60

    claimed = await runner.claim(event)
    assert claimed.status_code == 200, claimed.text
    notification = claimed.json()
    wake_id = notification["wakeId"]
    assert wake_id.startswith("w_")
    assert notification == {
        "consumerId": wake_id,
        "epoch": 1,
        "wakeId": wake_id,
        "streamPath": f"{url}/main",
        "streams": [{"path": f"{url}/main", "offset": ANY_OFFSET}],
        "callback": f"{server.origin}/_electric/callback-forward/{wake_id}",
        "claimToken": notification["claimToken"],
        "triggerEvent": "message_received",
        "entity": {
            "type": url.split("/")[1],
            "status": "idle",
            "url": url,
            "streams": {"main": f"{url}/main", "error": f"{url}/error"},
            "tags": {},
            "spawnArgs": {},
            "createdBy": ALICE_URL,
        },
        "principal": {"url": ALICE_URL, "key": "user:alice", "kind": "user", "id": "alice"},
    }
    assert list(notification) == [
        "consumerId",
        "epoch",
        "wakeId",
        "streamPath",
        "streams",
        "callback",
        "claimToken",
        "triggerEvent",
        "entity",
        "principal",
    ]
    assert await entity_status(http, url) == "running"
    row = await claim_row(db, wake_id)
    assert (row["status"], row["epoch"], row["runner_id"]) == ("active", 1, runner.id)
    assert (row["entity_url"], row["stream_path"], row["wake_id"]) == (url, f"{url}/main", wake_id)
    assert row["lease_expires_at"] > row["claimed_at"]
    state = await dispatch_state(db, url)
    assert (state["active_consumer_id"], state["active_runner_id"], state["active_epoch"]) == (
        wake_id,
        runner.id,
        1,
    )
    assert state["last_claimed_at"] is not None
    health = (await http.get(f"/_electric/runners/{runner.id}/health", headers=ALICE)).json()
    assert health["claims"]["active_count"] == 1
    assert health["claims"]["active"][0]["consumer_id"] == wake_id
    assert health["claims"]["active"][0]["entity_url"] == url
    assert health["dispatch"]["entities_with_active_claim"] == 1

    # The runtime's local claim, with the claim token: a write token.
    token = notification["claimToken"]
    local = await callback(http, notification, {"epoch": 1, "wakeId": wake_id}, token)
    assert local.status_code == 200, local.text
    write_token = local.json()["writeToken"]
    reply = {"type": "reply", "key": "r1", "value": {"text": "hi"}, "headers": {}}
    written = await http.post(
        f"{url}/main",
        content=orjson.dumps([reply]),
        headers={
            "content-type": "application/json",
            "authorization": f"Bearer {write_token}",
            "Producer-Id": f"entity-{url}",
            "Producer-Epoch": "1",
            "Producer-Seq": "0",
        },
    )
    assert written.status_code in (200, 204), written.text

    beat = await callback(http, notification, {"epoch": 1}, token)
    assert beat.status_code == 200, beat.text
    assert beat.json() == {"ok": True, "next_wake": False}
    beat_row = await claim_row(db, wake_id)
    assert beat_row["last_heartbeat_at"] is not None
    assert beat_row["lease_expires_at"] >= row["lease_expires_at"]

    offset = notification["streams"][0]["offset"]
    ack = {"path": f"{url}/main", "offset": offset}
    finished = await callback(http, notification, {"epoch": 1, "acks": [ack], "done": True}, token)
    assert finished.status_code == 200, finished.text
    # The runtime's own reply is new data on the main stream: a next wake.
    assert finished.json() == {"ok": True, "next_wake": True}
    assert await entity_status(http, url) == "idle"
    released = await claim_row(db, wake_id)
    assert released["status"] == "released"
    assert released["released_at"] is not None
    assert orjson.loads(released["acked_streams"]) == [ack]
    state = await dispatch_state(db, url)
    assert state["active_consumer_id"] is None and state["active_epoch"] is None
    assert state["last_released_at"] is not None and state["last_completed_at"] is not None
    health = (await http.get(f"/_electric/runners/{runner.id}/health", headers=ALICE)).json()
    assert health["claims"] == {"active_count": 0, "active": []}
    # The wake's write token died with it.
    late = await http.post(
        f"{url}/main", json=[reply], headers={"authorization": f"Bearer {write_token}"}
    )
    assert late.status_code == 401

    # The next wake, for the reply: a new generation, claimed and finished the same way.
    second_event = await runner.next_wake_event()
    assert second_event["generation"] == 2
    second = (await runner.claim(second_event)).json()
    assert second["epoch"] == 2 and second["wakeId"] != wake_id
    assert second["entity"]["status"] == "idle"
    acks = [{"path": f"{url}/main", "offset": second["streams"][0]["offset"]}]
    done = await callback(
        http, second, {"epoch": 2, "acks": acks, "done": True}, second["claimToken"]
    )
    assert done.json() == {"ok": True, "next_wake": False}
    assert await entity_status(http, url) == "idle"
    assert_error(
        await runner.claim(second_event),
        409,
        "NO_PENDING_WORK",
        "Subscription has no pending work",
    )


# --- the claim route's errors ---------------------------------------------------------------


async def test_claim_for_an_unknown_runner_is_not_found(http: httpx.AsyncClient) -> None:
    response = await Runner(http, unique_id("ghost")).claim({})
    assert_error(response, 404, "NOT_FOUND", "Runner not found")


async def test_claim_body_is_checked_before_the_runner_is_looked_up(
    http: httpx.AsyncClient,
) -> None:
    response = await Runner(http, unique_id("ghost")).claim({"generation": "one"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"
    not_json = await http.post(
        f"/_electric/runners/{unique_id('ghost')}/claim",
        content=b"{",
        headers={"content-type": "application/json", **ALICE},
    )
    assert_error(not_json, 400, "INVALID_REQUEST", "Invalid JSON body")


async def test_claim_by_another_principal_is_forbidden(http: httpx.AsyncClient) -> None:
    runner, _, event = await woken(http)
    response = await runner.claim(event, headers=BOB)
    assert_error(response, 403, "UNAUTHORIZED", "Runner claim requires the authenticated owner")
    # The wake is still there for its owner.
    assert (await runner.claim(event)).status_code == 200


async def test_claim_by_a_disabled_runner_is_refused(http: httpx.AsyncClient) -> None:
    runner, _, event = await woken(http)
    disabled = await http.post(f"/_electric/runners/{runner.id}/disable", headers=ALICE)
    assert disabled.status_code == 200, disabled.text
    assert_error(await runner.claim(event), 409, "NOT_RUNNING", "Runner is disabled")
    await http.post(f"/_electric/runners/{runner.id}/enable", headers=ALICE)
    assert (await runner.claim(event)).status_code == 200


@pytest.mark.parametrize(
    "subscription_id",
    ["runner:other", "runner:{id}x", "webhook:abc", "runner:{id}-suffix:x", ""],
)
async def test_claim_of_another_runners_subscription_is_a_bad_request(
    http: httpx.AsyncClient, subscription_id: str
) -> None:
    runner = await register_runner(http)
    response = await runner.claim({"subscription_id": subscription_id.format(id=runner.id)})
    assert_error(
        response, 400, "INVALID_REQUEST", "Wake event subscription_id does not match runner"
    )


async def test_claim_without_a_subscription_is_no_content(http: httpx.AsyncClient) -> None:
    runner = await register_runner(http)
    # No subscription_id: `runner:<id>`, which no dispatch ever creates.
    response = await runner.claim({})
    assert response.status_code == 204, response.text
    assert response.content == b""
    named = await runner.claim({"subscription_id": f"runner:{runner.id}:nothing-here"})
    assert named.status_code == 204


async def test_claim_with_nothing_pending_is_a_conflict(http: httpx.AsyncClient) -> None:
    runner, url = await dispatched_entity(http)
    event = {"subscription_id": f"runner:{runner.id}:{sha16(url)}"}
    # The subscription exists from spawn on, but nothing has been appended since.
    assert_error(
        await runner.claim(event), 409, "NO_PENDING_WORK", "Subscription has no pending work"
    )


async def test_second_claim_of_a_claimed_wake_is_already_claimed(
    http: httpx.AsyncClient,
) -> None:
    runner, _, event = await woken(http)
    first = await runner.claim(event)
    assert first.status_code == 200, first.text
    second = await runner.claim(event)
    # Only code and message, as the reference forwards them.
    assert_error(second, 409, "ALREADY_CLAIMED", "Wake is already claimed")


async def test_claim_of_a_non_pull_wake_subscription_is_a_bad_request(
    http: httpx.AsyncClient,
) -> None:
    runner = await register_runner(http)
    subscription_id = f"runner:{runner.id}:hooked"
    created = await http.put(
        f"/__ds/subscriptions/{subscription_id}",
        json={
            "type": "webhook",
            "pattern": "nothing/**",
            "webhook": {"url": "http://127.0.0.1:9/x"},
        },
    )
    assert created.status_code == 201, created.text
    response = await runner.claim({"subscription_id": subscription_id})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


# --- entities that must not run -------------------------------------------------------------


async def test_claim_for_a_paused_entity_answers_done_and_does_not_wake_again(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner, url, event = await woken(http)
    paused = await http.post(
        f"/_electric/entities{url}/signal", json={"signal": "SIGSTOP"}, headers=ALICE
    )
    assert paused.status_code == 200, paused.text
    assert await entity_status(http, url) == "paused"

    response = await runner.claim(event)
    assert response.status_code == 200, response.text
    assert response.json() == {"done": True}
    assert await entity_status(http, url) == "paused"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM consumer_claims WHERE tenant_id = $1 AND entity_url = $2",
            TENANT,
            url,
        )
        == 0
    )
    # The wake ended with its stream acknowledged: no new wake for the same message.
    assert_error(
        await runner.claim(event), 409, "NO_PENDING_WORK", "Subscription has no pending work"
    )


async def test_claim_for_a_killed_entity_answers_done(http: httpx.AsyncClient) -> None:
    runner, url, event = await woken(http)
    killed = await http.post(
        f"/_electric/entities{url}/signal", json={"signal": "SIGKILL"}, headers=ALICE
    )
    assert killed.status_code == 200, killed.text
    response = await runner.claim(event)
    assert response.status_code == 200, response.text
    assert response.json() == {"done": True}
    assert await entity_status(http, url) == "killed"


# --- callback-forward for pull-wake consumers -----------------------------------------------


async def test_pull_wake_heartbeat_and_done_require_the_claim_token(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    _, url, notification = await claimed_wake(http)
    for body in ({"epoch": 1}, {"epoch": 1, "acks": [], "done": True}):
        response = await callback(http, notification, body, None)
        assert_error(response, 401, "UNAUTHORIZED", "Missing claim token")
    local = await callback(http, notification, {"epoch": 1, "wakeId": notification["wakeId"]}, None)
    assert_error(local, 401, "UNAUTHORIZED", "Missing claim token")
    # Nothing was released by the refused calls.
    assert (await claim_row(db, notification["wakeId"]))["status"] == "active"
    assert await entity_status(http, url) == "running"


async def test_pull_wake_done_with_a_forged_or_stale_token_fails_the_forward(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    _, url, notification = await claimed_wake(http)
    forged = await callback(http, notification, {"epoch": 1, "done": True}, "not-a-token")
    assert forged.status_code == 502, forged.text
    assert forged.json()["error"]["code"] == "CALLBACK_FORWARD_FAILED"
    stale = await callback(
        http, notification, {"epoch": 7, "done": True}, notification["claimToken"]
    )
    assert stale.status_code == 502, stale.text
    assert "FENCED" in stale.json()["error"]["message"]
    assert (await claim_row(db, notification["wakeId"]))["status"] == "active"
    assert await entity_status(http, url) == "running"


async def test_done_of_a_stopping_entity_stops_it(http: httpx.AsyncClient) -> None:
    _, url, notification = await claimed_wake(http)
    stopping = await http.post(
        f"/_electric/entities{url}/signal", json={"signal": "SIGTERM"}, headers=ALICE
    )
    assert stopping.status_code == 200, stopping.text
    assert await entity_status(http, url) == "stopping"
    done = await callback(
        http, notification, {"epoch": 1, "done": True}, notification["claimToken"]
    )
    assert done.status_code == 200, done.text
    assert await entity_status(http, url) == "stopped"


async def claimed_wake(http: httpx.AsyncClient) -> tuple[Runner, str, dict[str, Any]]:
    runner, url, event = await woken(http)
    response = await runner.claim(event)
    assert response.status_code == 200, response.text
    notification: dict[str, Any] = response.json()
    return runner, url, notification


# --- dispatch linking -----------------------------------------------------------------------


async def test_spawn_with_a_policy_naming_an_unknown_runner_is_not_found(
    http: httpx.AsyncClient,
) -> None:
    runner_id = unique_id("ghost")
    response = await http.put(
        f"/_electric/entities/{await runner_type(http, await register_runner(http))}/{unique_id()}",
        json={"dispatch_policy": {"targets": [{"type": "runner", "runnerId": runner_id}]}},
        headers=ALICE,
    )
    assert_error(response, 404, "NOT_FOUND", f'Runner "{runner_id}" not found')


async def test_terminal_entity_leaves_its_runner_subscription(
    http: httpx.AsyncClient,
) -> None:
    runner, url = await dispatched_entity(http)
    subscription_id = f"runner:{runner.id}:{sha16(url)}"
    subscription = (await http.get(f"/__ds/subscriptions/{subscription_id}")).json()
    assert subscription["type"] == "pull-wake"
    assert subscription["wake_stream"] == f"runners/{runner.id}/wake"
    assert [s["path"] for s in subscription["streams"]] == [f"{url.lstrip('/')}/main"]
    killed = await http.post(
        f"/_electric/entities{url}/signal", json={"signal": "SIGKILL"}, headers=ALICE
    )
    assert killed.status_code == 200, killed.text
    after = (await http.get(f"/__ds/subscriptions/{subscription_id}")).json()
    assert after["streams"] == []


# --- ugly cases -----------------------------------------------------------------------------


async def test_claim_body_must_be_an_object(http: httpx.AsyncClient) -> None:
    runner = await register_runner(http)
    for body in (b"[]", b'"wake"', b"3"):
        response = await http.post(
            f"/_electric/runners/{runner.id}/claim",
            content=body,
            headers={"content-type": "application/json", **ALICE},
        )
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_concurrent_claims_of_one_wake_have_one_winner(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner, url, event = await woken(http)
    responses = await asyncio.gather(*(runner.claim(event) for _ in range(6)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409, 409, 409, 409, 409], [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert response.json()["error"]["code"] == "ALREADY_CLAIMED"
    assert await entity_status(http, url) == "running"
    active = await db.fetchval(
        """
        SELECT count(*) FROM consumer_claims
        WHERE tenant_id = $1 AND entity_url = $2 AND status = 'active'
        """,
        TENANT,
        url,
    )
    assert active == 1


async def test_claim_survives_a_server_crash(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """Claims, their tokens and write tokens are durable: after kill -9 and a restart the
    runner finishes its wake as if nothing happened."""
    runner, url, notification = await claimed_wake(http)
    token = notification["claimToken"]
    local = await callback(
        http, notification, {"epoch": 1, "wakeId": notification["wakeId"]}, token
    )
    write_token = local.json()["writeToken"]

    server.kill9()
    server.restart()

    health = await http.get(f"/_electric/runners/{runner.id}/health", headers=ALICE)
    assert health.status_code == 200, health.text
    assert health.json()["claims"]["active_count"] == 1
    beat = await callback(http, notification, {"epoch": 1}, token)
    assert beat.status_code == 200, beat.text
    written = await http.post(
        f"{url}/main",
        json=[{"type": "reply", "key": "r1", "value": {}, "headers": {}}],
        headers={"authorization": f"Bearer {write_token}"},
    )
    assert written.status_code in (200, 204), written.text
    ack = {"path": f"{url}/main", "offset": notification["streams"][0]["offset"]}
    done = await callback(http, notification, {"epoch": 1, "acks": [ack], "done": True}, token)
    assert done.status_code == 200, done.text
    assert await entity_status(http, url) == "idle"
    assert (await claim_row(db, notification["wakeId"]))["status"] == "released"


async def test_a_claim_whose_lease_ran_out_is_expired_by_the_next_claim(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner, url, first = await claimed_wake(http)
    subscription_id = f"runner:{runner.id}:{sha16(url)}"
    # The runner went quiet: its lease runs out, and the wake is issued again.
    await db.execute(
        "UPDATE ds_subscriptions SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        subscription_id,
    )
    again = await runner.next_wake_event()
    assert again["generation"] == 2
    response = await runner.claim(again)
    assert response.status_code == 200, response.text
    second = response.json()
    assert second["epoch"] == 2
    assert (await claim_row(db, first["wakeId"]))["status"] == "expired"
    assert (await claim_row(db, second["wakeId"]))["status"] == "active"
    health = (await http.get(f"/_electric/runners/{runner.id}/health", headers=ALICE)).json()
    assert [claim["consumer_id"] for claim in health["claims"]["active"]] == [second["wakeId"]]

    # The first holder's late done is fenced, and changes nothing.
    late = await callback(http, first, {"epoch": 1, "done": True}, first["claimToken"])
    assert late.status_code == 502, late.text
    assert "FENCED" in late.json()["error"]["message"]
    assert await entity_status(http, url) == "running"
    ack = {"path": f"{url}/main", "offset": second["streams"][0]["offset"]}
    done = await callback(
        http, second, {"epoch": 2, "acks": [ack], "done": True}, second["claimToken"]
    )
    assert done.json() == {"ok": True, "next_wake": False}
    assert await entity_status(http, url) == "idle"


async def test_runner_target_with_its_own_subscription_id_is_claimable(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner = await register_runner(http)
    type_name = await runner_type(http, runner)
    target = {"type": "runner", "runnerId": runner.id, "subscription_id": "nightly"}
    response = await http.put(
        f"/_electric/entities/{type_name}/{unique_id()}",
        json={"dispatch_policy": {"targets": [target]}},
        headers=ALICE,
    )
    assert response.status_code == 201, response.text
    url = response.json()["url"]
    await send(http, url, "hello")
    event = await runner.next_wake_event()
    assert event["subscription_id"] == f"nightly:{sha16(url)}"
    claimed = await runner.claim(event)
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["entity"]["url"] == url
    assert (await claim_row(db, claimed.json()["wakeId"]))["runner_id"] == runner.id
    # Another runner cannot claim from it: the subscription writes to someone else's stream.
    other = await register_runner(http)
    assert_error(
        await other.claim(event),
        400,
        "INVALID_REQUEST",
        "Wake event subscription_id does not match runner",
    )


async def test_wake_of_a_stream_no_entity_owns_is_not_found_and_ended(
    http: httpx.AsyncClient,
) -> None:
    runner = await register_runner(http)
    stream = f"plain-{unique_id()}/data"
    created = await http.put(f"/{stream}", headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    subscription_id = f"runner:{runner.id}:plain"
    subscribed = await http.put(
        f"/__ds/subscriptions/{subscription_id}",
        json={"type": "pull-wake", "streams": [stream], "wake_stream": runner.wake_stream[1:]},
    )
    assert subscribed.status_code == 201, subscribed.text
    appended = await http.post(f"/{stream}", json=[{"n": 1}])
    assert appended.status_code in (200, 204), appended.text
    event = await runner.next_wake_event()
    assert event["subscription_id"] == subscription_id
    assert_error(
        await runner.claim(event), 404, "NOT_FOUND", "Claim stream is not attached to an entity"
    )
    # Ended, not left claimed until its lease runs out.
    assert_error(
        await runner.claim(event), 409, "NO_PENDING_WORK", "Subscription has no pending work"
    )


async def test_claim_of_a_subscription_id_with_nul_is_no_content(
    http: httpx.AsyncClient,
) -> None:
    runner = await register_runner(http)
    response = await runner.claim({"subscription_id": f"runner:{runner.id}:\x00"})
    assert response.status_code == 204, response.text
    bad = await runner.claim({"subscription_id": "\x00"})
    assert bad.status_code == 400, bad.text


async def test_callback_forward_for_a_consumer_id_with_nul_is_not_found(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post(
        "/_electric/callback-forward/w_%00",
        json={"epoch": 1},
        headers={"authorization": "Bearer x"},
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "CALLBACK_NOT_FOUND"


async def test_runner_registered_again_with_another_wake_stream_gets_its_wakes_there(
    http: httpx.AsyncClient,
) -> None:
    runner, url = await dispatched_entity(http)
    moved = await http.post(
        "/_electric/runners",
        json={"id": runner.id, "label": "laptop", "wake_stream": f"/runners/{runner.id}/v2"},
        headers=ALICE,
    )
    assert moved.status_code == 201, moved.text
    await send(http, url, "hello")
    event = await _next_event_on(http, f"/runners/{runner.id}/v2")
    assert event["subscription_id"] == f"runner:{runner.id}:{sha16(url)}"
    claimed = await runner.claim(event)
    assert claimed.status_code == 200, claimed.text
    old = await http.get(runner.wake_stream, params={"offset": "-1"})
    assert old.json() == []


async def _next_event_on(http: httpx.AsyncClient, path: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        events = (await http.get(path, params={"offset": "-1"})).json()
        if events:
            event: dict[str, Any] = events[0]
            return event
        await asyncio.sleep(0.05)
    raise AssertionError(f"no wake event on {path}")


async def test_done_after_a_kill_releases_the_claim_and_the_entity_stays_killed(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    _, url, notification = await claimed_wake(http)
    killed = await http.post(
        f"/_electric/entities{url}/signal", json={"signal": "SIGKILL"}, headers=ALICE
    )
    assert killed.status_code == 200, killed.text
    ack = {"path": f"{url}/main", "offset": notification["streams"][0]["offset"]}
    done = await callback(
        http, notification, {"epoch": 1, "acks": [ack], "done": True}, notification["claimToken"]
    )
    assert done.status_code == 200, done.text
    assert await entity_status(http, url) == "killed"
    assert (await claim_row(db, notification["wakeId"]))["status"] == "released"

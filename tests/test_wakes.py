"""Wake registrations (spec/02 §3.2 `POST /_electric/wake`, §4.11; spec/03 §4) against a
real `serve` process: runFinished wakes with the child's response, change observers with
debounce and timeouts, one-shot registrations, shared-state sources, one registration per
manifest key, and a pending debounced wake surviving kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import (
    JSON,
    TENANT,
    eventually,
    mint_token,
    module_serve_server,
    read_events,
    register_type,
    spawn_entity,
    unique_id,
)
from conftest import ServerFactory, ServerProcess
from test_dispatch import Handler, Wake, claim, done, subscribe_type

pytestmark = pytest.mark.timeout(120)

NOTE_TYPE = "wakenote"


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("wakes"))


@pytest.fixture
async def db(db: asyncpg.Connection, http: httpx.AsyncClient, server: ServerProcess) -> Any:
    """conftest's connection, with this module's type registered first."""
    await register_type(http, server, NOTE_TYPE)
    return db


# --- helpers --------------------------------------------------------------------------------


async def spawn_url(
    http: httpx.AsyncClient, server: ServerProcess, type_name: str, **body: Any
) -> str:
    url: str = (await spawn_entity(http, server, type_name, **body))["url"]
    return url


async def register_wake(
    http: httpx.AsyncClient, server: ServerProcess, **body: Any
) -> httpx.Response:
    return await http.post(f"{server.origin}/_electric/wake", json=body)


async def append(
    http: httpx.AsyncClient,
    server: ServerProcess,
    path: str,
    events: list[dict[str, Any]],
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = {**JSON, **(headers or {})}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    response = await http.post(f"{server.origin}{path}", content=orjson.dumps(events), headers=sent)
    assert response.status_code in (200, 204), response.text
    return response


def note(key: str, operation: str = "insert", event_type: str = "note") -> dict[str, Any]:
    return {
        "type": event_type,
        "key": key,
        "value": {"text": key},
        "headers": {"operation": operation},
    }


async def wakes_in(
    http: httpx.AsyncClient, server: ServerProcess, url: str
) -> list[dict[str, Any]]:
    return [e for e in await read_events(http, server, f"{url}/main") if e.get("type") == "wake"]


async def wait_for_wakes(
    http: httpx.AsyncClient, server: ServerProcess, url: str, count: int
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal found
        found = await wakes_in(http, server, url)
        return len(found) >= count

    await eventually(enough, f"{count} wake(s) in {url}/main")
    return found


async def registrations(db: asyncpg.Connection, subscriber: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM wake_registrations WHERE tenant_id = $1 AND subscriber_url = $2 ORDER BY id",
        TENANT,
        subscriber,
    )


# --- runFinished: the manager/worker flow ---------------------------------------------------


class Worker:
    """The child's handler, as the runtime behaves: on its first wake it claims, writes a
    run with two text deltas, completes the run and reports done; later wakes (for its own
    writes) are claimed and done without writing."""

    def __init__(self, http: httpx.AsyncClient, server: ServerProcess, fail: bool = False) -> None:
        self.http = http
        self.server = server
        self.fail = fail
        self.handler = Handler(answer=self.answer)
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: list[BaseException] = []
        self.wrote = False

    async def answer(self, wake: Wake) -> tuple[int, Any]:
        self.tasks.append(asyncio.create_task(self.work(wake)))
        return 200, {"ok": True}

    async def work(self, wake: Wake) -> None:
        try:
            claimed = await claim(self.http, wake, wake.body["claimToken"])
            assert claimed.status_code == 200, claimed.text
            if not self.wrote:
                self.wrote = True
                await self.write_run(wake, claimed.json()["writeToken"])
            finished = await done(self.http, wake, wake.body["streams"][0]["offset"])
            assert finished.status_code == 200, finished.text
        except BaseException as error:  # surfaced by the test
            self.errors.append(error)

    async def write_run(self, wake: Wake, token: str) -> None:
        url = wake.body["entity"]["url"]
        producer = {
            "Producer-Id": f"entity-{url}",
            "Producer-Epoch": str(wake.body["epoch"]),
        }
        started = [
            {
                "type": "run",
                "key": "run-1",
                "value": {"status": "started"},
                "headers": {"operation": "insert"},
            },
            {
                "type": "text_delta",
                "key": "td-1",
                "value": {"run_id": "run-1", "delta": "Hello, "},
                "headers": {"operation": "insert"},
            },
            {
                "type": "text_delta",
                "key": "td-x",
                "value": {"run_id": "run-0", "delta": "other run"},
                "headers": {"operation": "insert"},
            },
        ]
        await append(
            self.http, self.server, f"{url}/main", started, token, {**producer, "Producer-Seq": "0"}
        )
        status = "failed" if self.fail else "completed"
        finished = [
            {
                "type": "text_delta",
                "key": "td-2",
                "value": {"run_id": "run-1", "delta": "world"},
                "headers": {"operation": "insert"},
            },
            {
                "type": "error",
                "key": "err-1",
                "value": {"run_id": "run-1", "message": "boom"},
                "headers": {"operation": "insert"},
            },
            {
                "type": "run",
                "key": "run-1",
                "value": {"status": status},
                "headers": {"operation": "update"},
            },
        ]
        await append(
            self.http,
            self.server,
            f"{url}/main",
            finished,
            token,
            {**producer, "Producer-Seq": "1"},
        )

    async def __aenter__(self) -> Worker:
        await self.handler.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, 10)
        await self.handler.close()


@pytest.mark.parametrize("fail", [False, True], ids=["completed", "failed"])
async def test_child_run_finishing_wakes_the_parent_once_with_its_response(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection, fail: bool
) -> None:
    manager_type, worker_type = unique_id("manager"), unique_id("worker")
    await register_type(http, server, manager_type)
    await register_type(http, server, worker_type)
    manager_handler = await Handler().start()
    try:
        await subscribe_type(http, server, manager_type, manager_handler)
        parent = await spawn_url(http, server, manager_type)
        async with Worker(http, server, fail=fail) as worker:
            await subscribe_type(http, server, worker_type, worker.handler)
            child_id = unique_id("c")
            manifest_key = f"child:{worker_type}:{child_id}"
            wake = {
                "subscriberUrl": parent,
                "condition": "runFinished",
                "includeResponse": True,
                "manifestKey": manifest_key,
            }
            response = await http.put(
                f"{server.origin}/_electric/entities/{worker_type}/{child_id}",
                json={"parent": parent, "wake": wake, "initialMessage": {"text": "go"}},
            )
            assert response.status_code == 201, response.text
            child = response.json()["url"]
            # The runtime also registers the manifest's copy of the same wake (0.4.8).
            again = await register_wake(http, server, sourceUrl=child, **wake)
            assert again.status_code == 204, again.text

            wakes = await wait_for_wakes(http, server, parent, 1)
            await worker.handler.wait_for_deliveries(2)
        assert not worker.errors, worker.errors
        (registration,) = await registrations(db, parent)
        assert registration["manifest_key"] == manifest_key
        value = wakes[0]["value"]
        assert wakes[0]["key"] == f"wake-{registration['id']}-update:run-1"
        assert wakes[0]["headers"] == {
            "operation": "insert",
            "offset": wakes[0]["headers"]["offset"],
        }
        assert value["source"] == child
        assert value["timeout"] is False
        assert value["changes"] == [{"collection": "runs", "kind": "update", "key": "run-1"}]
        expected: dict[str, Any] = {
            "url": child,
            "type": worker_type,
            "run_status": "failed" if fail else "completed",
            "response": "Hello, world",
        }
        if fail:
            expected["error"] = "boom"
        assert value["finished_child"] == expected
        # The wake event wakes the parent's handler through its dispatch link.
        woken = await manager_handler.wait_for_deliveries(1)
        assert woken[0].body["entity"]["url"] == parent
        # Exactly one wake, also after the child's later wakes settled.
        assert len(await wakes_in(http, server, parent)) == 1
    finally:
        await manager_handler.close()


async def test_run_finished_observer_that_is_not_the_parent_gets_no_finished_child(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    response = await register_wake(
        http, server, subscriberUrl=observer, sourceUrl=source, condition="runFinished"
    )
    assert response.status_code == 204, response.text
    assert response.content == b""
    token = await mint_token(db, source)
    # Inserts and non-final updates never match.
    await append(
        http,
        server,
        f"{source}/main",
        [
            {
                "type": "run",
                "key": "r",
                "value": {"status": "completed"},
                "headers": {"operation": "insert"},
            },
            {
                "type": "run",
                "key": "r",
                "value": {"status": "running"},
                "headers": {"operation": "update"},
            },
        ],
        token,
    )
    await append(
        http,
        server,
        f"{source}/main",
        [
            {
                "type": "run",
                "key": "r",
                "value": {"status": "completed"},
                "headers": {"operation": "update"},
            },
        ],
        token,
    )
    (wake,) = await wait_for_wakes(http, server, observer, 1)
    assert "finished_child" not in wake["value"]
    assert wake["value"]["changes"] == [{"collection": "runs", "kind": "update", "key": "r"}]


# --- change observers -----------------------------------------------------------------------


async def test_change_observer_with_debounce_gets_one_wake_for_a_burst(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    response = await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change", "collections": ["note"], "ops": ["insert", "update"]},
        debounceMs=1000,
    )
    assert response.status_code == 204, response.text
    token = await mint_token(db, source)
    for i in range(4):
        await append(http, server, f"{source}/main", [note(f"n{i}")], token)
    # Neither another type nor a delete is a change for this condition.
    await append(http, server, f"{source}/main", [note("x", event_type="other")], token)
    await append(http, server, f"{source}/main", [note("n0", operation="delete")], token)
    await append(http, server, f"{source}/main", [note("n1", operation="update")], token)

    (wake,) = await wait_for_wakes(http, server, observer, 1)
    (registration,) = await registrations(db, observer)
    assert wake["key"] == f"wake-{registration['id']}-n1"
    assert wake["value"]["changes"] == [
        {"collection": "note", "kind": "insert", "key": "n0"},
        {"collection": "note", "kind": "insert", "key": "n1"},
        {"collection": "note", "kind": "insert", "key": "n2"},
        {"collection": "note", "kind": "insert", "key": "n3"},
        {"collection": "note", "kind": "update", "key": "n1"},
    ]
    assert await db.fetchval("SELECT count(*) FROM wake_debounce_buffers") == 0
    # A later burst is a new batch.
    await append(http, server, f"{source}/main", [note("n9")], token)
    wakes = await wait_for_wakes(http, server, observer, 2)
    assert [w["value"]["changes"] for w in wakes[1:]] == [
        [{"collection": "note", "kind": "insert", "key": "n9"}]
    ]


async def test_timeout_fires_once_when_nothing_matches_and_keeps_the_registration(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    response = await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change", "collections": ["note"]},
        timeoutMs=300,
    )
    assert response.status_code == 204
    (wake,) = await wait_for_wakes(http, server, observer, 1)
    (registration,) = await registrations(db, observer)
    assert registration["timeout_consumed"] is True
    assert wake["key"] == f"wake-{registration['id']}-timeout"
    assert wake["value"]["timeout"] is True
    assert wake["value"]["changes"] == []
    assert wake["value"]["source"] == source
    # The registration stays and still wakes on a match.
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("late")], token)
    wakes = await wait_for_wakes(http, server, observer, 2)
    assert wakes[1]["value"]["timeout"] is False


async def test_a_match_cancels_the_timeout(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change"},
        timeoutMs=60_000,
    )
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("n")], token)
    (wake,) = await wakes_in(http, server, observer)  # delivered in the append's transaction
    assert wake["value"]["timeout"] is False
    (registration,) = await registrations(db, observer)
    assert registration["timeout_consumed"] is True


async def test_one_shot_registration_is_removed_at_its_first_match(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    # No route registers one-shot wakes (spec/03 §4.8); the registry supports them.
    for debounce in (0, 200):
        await db.execute(
            """
            INSERT INTO wake_registrations
                (tenant_id, subscriber_url, source_url, condition, one_shot, debounce_ms)
            VALUES ($1, $2, $3, '{"on":"change"}', true, $4)
            """,
            TENANT,
            observer,
            source,
            debounce,
        )
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("a"), note("b")], token)
    wakes = await wait_for_wakes(http, server, observer, 2)
    await eventually(
        lambda: _no_registrations(db, observer), "one-shot registrations to be removed"
    )
    await append(http, server, f"{source}/main", [note("c")], token)
    assert len(await wakes_in(http, server, observer)) == 2
    # The plain one fired for "a" alone; the debounced one (which the reference never
    # delivered) for its batch.
    changes = sorted(len(w["value"]["changes"]) for w in wakes)
    assert changes == [1, 2]


async def _no_registrations(db: asyncpg.Connection, subscriber: str) -> bool:
    return not await registrations(db, subscriber)


async def test_shared_state_append_wakes_an_observer(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    path = f"/_electric/shared-state/{unique_id('db')}"
    created = await http.put(f"{server.origin}{path}", headers=JSON)
    assert created.status_code == 201, created.text
    await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=path,
        condition={"on": "change", "collections": ["items"], "ops": ["insert"]},
    )
    # No token needed for shared state (spec/03 §5.6).
    await append(http, server, path, [note("i1", event_type="items")])
    (wake,) = await wait_for_wakes(http, server, observer, 1)
    assert wake["value"]["source"] == path
    assert wake["value"]["changes"] == [{"collection": "items", "kind": "insert", "key": "i1"}]
    (registration,) = await registrations(db, observer)
    assert wake["key"] == f"wake-{registration['id']}-insert:i1"


async def test_non_terminal_signal_is_a_change_on_the_entity(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change", "collections": ["signal"]},
    )
    signalled = await http.post(
        f"{server.origin}/_electric/entities{source}/signal", json={"signal": "SIGUSR"}
    )
    assert signalled.status_code == 200, signalled.text
    (wake,) = await wakes_in(http, server, observer)
    assert wake["value"]["changes"][0]["collection"] == "signal"
    # A terminal one removes the source's registrations instead (spec/03 §4.12).
    killed = await http.post(
        f"{server.origin}/_electric/entities{source}/signal", json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    assert await registrations(db, observer) == []
    assert len(await wakes_in(http, server, observer)) == 1


# --- registration rules ---------------------------------------------------------------------


async def test_one_registration_per_manifest_key_and_no_unkeyed_duplicates(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    keyed = {"subscriberUrl": observer, "sourceUrl": source, "manifestKey": "observe:x"}
    for condition in ({"on": "change", "ops": ["update"]}, {"on": "change"}, {"on": "change"}):
        response = await register_wake(http, server, condition=condition, **keyed)
        assert response.status_code == 204, response.text
    # The same unkeyed registration twice is one row (NULL keys do not make it distinct).
    for _ in range(2):
        await register_wake(
            http, server, subscriberUrl=observer, sourceUrl=source, condition="runFinished"
        )
    rows = await registrations(db, observer)
    assert [(r["manifest_key"], orjson.loads(r["condition"])) for r in rows] == [
        ("observe:x", {"on": "change"}),
        (None, "runFinished"),
    ]
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("n")], token)
    assert len(await wakes_in(http, server, observer)) == 1
    # A retried append (same producer, same seq) wakes no one again.
    producer = {"Producer-Id": "p1", "Producer-Epoch": "0", "Producer-Seq": "0"}
    await append(http, server, f"{source}/main", [note("m")], token, producer)
    await append(http, server, f"{source}/main", [note("m")], token, producer)
    assert len(await wakes_in(http, server, observer)) == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"[]", 400),
        (orjson.dumps({"sourceUrl": "/a/b", "condition": "runFinished"}), 400),
        (orjson.dumps({"subscriberUrl": "/a/b", "sourceUrl": 1, "condition": "runFinished"}), 400),
        (orjson.dumps({"subscriberUrl": "/a", "sourceUrl": "/b", "condition": "whenever"}), 400),
        (orjson.dumps({"subscriberUrl": "/a", "sourceUrl": "/b", "condition": {"on": "x"}}), 400),
        (
            orjson.dumps(
                {
                    "subscriberUrl": "/a",
                    "sourceUrl": "/b",
                    "condition": {"on": "change", "ops": ["upsert"]},
                }
            ),
            400,
        ),
        (
            orjson.dumps(
                {
                    "subscriberUrl": "/a",
                    "sourceUrl": "/b",
                    "condition": "runFinished",
                    "debounceMs": "5",
                }
            ),
            400,
        ),
        (
            orjson.dumps(
                {
                    "subscriberUrl": "/a",
                    "sourceUrl": "/b",
                    "condition": "runFinished",
                    "timeoutMs": 1e12,
                }
            ),
            400,
        ),
        (
            orjson.dumps(
                {
                    "subscriberUrl": "/a",
                    "sourceUrl": "/b",
                    "condition": "runFinished",
                    "includeResponse": "no",
                }
            ),
            400,
        ),
    ],
)
async def test_bad_registration_bodies_are_400_invalid_request(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection, body: bytes, status: int
) -> None:
    response = await http.post(f"{server.origin}/_electric/wake", content=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"
    assert (
        await db.fetchval(
            "SELECT count(*) FROM wake_registrations WHERE subscriber_url IN ('/a', '/a/b')"
        )
        == 0
    )


async def test_wake_to_a_missing_subscriber_is_dropped_without_failing_the_append(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http, server, subscriberUrl="/nobody/here", sourceUrl=source, condition={"on": "change"}
    )
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("n")], token)
    events = await read_events(http, server, f"{source}/main")
    assert events[-1]["key"] == "n"


# --- crash safety ---------------------------------------------------------------------------


async def test_pending_debounce_and_timeout_survive_kill9_and_fire_once(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    server = server_factory("serve")
    await register_type(http, server, NOTE_TYPE)
    assert server.database_url is not None
    db = await asyncpg.connect(server.database_url)
    try:
        observer = await spawn_url(http, server, NOTE_TYPE)
        source = await spawn_url(http, server, NOTE_TYPE)
        quiet = await spawn_url(http, server, NOTE_TYPE)
        for source_url, deadline in ((source, "debounceMs"), (quiet, "timeoutMs")):
            response = await register_wake(
                http,
                server,
                subscriberUrl=observer,
                sourceUrl=source_url,
                condition={"on": "change"},
                **{deadline: 3000},
            )
            assert response.status_code == 204
        token = await mint_token(db, source)
        await append(http, server, f"{source}/main", [note("a"), note("b")], token)
        # The buffer is durable the moment the append is acknowledged.
        assert await db.fetchval("SELECT count(*) FROM wake_debounce_buffers") == 1
        server.kill9()
        assert await wakes_in_db(db, observer) == 0
        server.start()
        wakes = await wait_for_wakes(http, server, observer, 2)
        by_source = {w["value"]["source"]: w["value"] for w in wakes}
        assert [c["key"] for c in by_source[source]["changes"]] == ["a", "b"]
        assert by_source[quiet]["timeout"] is True
        assert await db.fetchval("SELECT count(*) FROM wake_debounce_buffers") == 0
        server.restart()
        assert len(await wakes_in(http, server, observer)) == 2
    finally:
        await db.close()


async def wakes_in_db(db: asyncpg.Connection, url: str) -> int:
    """Wake events stored in an entity's main stream, read from the database while the
    server is down."""
    count = await db.fetchval(
        """
        SELECT count(*) FROM ds_messages m JOIN ds_streams s ON s.id = m.stream_id
        WHERE s.path = $1 AND position('"type":"wake"' in convert_from(m.data, 'UTF8')) > 0
        """,
        url.lstrip("/") + "/main",
    )
    return int(count)


# --- ugly cases -----------------------------------------------------------------------------


async def test_mutual_observers_appending_concurrently_all_succeed_and_all_wake(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """A watches B and B watches A: concurrent appends lock the two streams in opposite
    orders; a deadlock victim is retried, so every append succeeds and wakes once."""
    a = await spawn_url(http, server, NOTE_TYPE)
    b = await spawn_url(http, server, NOTE_TYPE)
    for subscriber, source in ((a, b), (b, a)):
        await register_wake(
            http,
            server,
            subscriberUrl=subscriber,
            sourceUrl=source,
            condition={"on": "change", "collections": ["note"]},
        )
    tokens = {a: await mint_token(db, a), b: await mint_token(db, b)}
    rounds = 12

    async def writes(source: str) -> None:
        for i in range(rounds):
            await append(http, server, f"{source}/main", [note(f"n{i}")], tokens[source])

    await asyncio.gather(writes(a), writes(b), writes(a), writes(b))
    for subscriber in (a, b):
        wakes = await wakes_in(http, server, subscriber)
        # Two writers per source reuse the keys n0..n11, so the wakes deduplicate to one
        # per key (the wake producer is per registration and source event key).
        assert sorted(w["value"]["changes"][0]["key"] for w in wakes) == sorted(
            f"n{i}" for i in range(rounds)
        )


async def test_concurrent_burst_from_many_writers_is_one_debounced_batch(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change"},
        debounceMs=1000,
    )
    token = await mint_token(db, source)
    await asyncio.gather(
        *(append(http, server, f"{source}/main", [note(f"k{i}")], token) for i in range(20))
    )
    (wake,) = await wait_for_wakes(http, server, observer, 1)
    assert sorted(c["key"] for c in wake["value"]["changes"]) == sorted(f"k{i}" for i in range(20))


async def test_wake_to_a_closed_subscriber_stream_does_not_fail_the_source_append(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    subscriber = await spawn_url(http, server, NOTE_TYPE)
    killed = await http.post(
        f"{server.origin}/_electric/entities{subscriber}/signal", json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    source = await spawn_url(http, server, NOTE_TYPE)
    # Registering has no ownership or status check (spec/03 §4.1 #2).
    await register_wake(
        http, server, subscriberUrl=subscriber, sourceUrl=source, condition={"on": "change"}
    )
    token = await mint_token(db, source)
    await append(http, server, f"{source}/main", [note("n")], token)
    assert (await read_events(http, server, f"{source}/main"))[-1]["key"] == "n"
    assert await wakes_in(http, server, subscriber) == []


async def test_timeouts_and_debounce_fire_once_with_two_server_processes(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    first = server_factory("serve")
    second = server_factory("serve")
    await register_type(http, first, NOTE_TYPE)
    observer = await spawn_url(http, first, NOTE_TYPE)
    sources = [await spawn_url(http, second, NOTE_TYPE) for _ in range(6)]
    for i, source in enumerate(sources):
        origin = first if i % 2 else second
        response = await register_wake(
            http,
            origin,
            subscriberUrl=observer,
            sourceUrl=source,
            condition={"on": "change"},
            timeoutMs=200,
            debounceMs=100,
        )
        assert response.status_code == 204
    await wait_for_wakes(http, first, observer, len(sources))
    # Both workers poll the same rows: SKIP LOCKED, the consumed flag and the wake's
    # idempotent producer leave one wake per registration.
    wakes = await wakes_in(http, second, observer)
    assert len(wakes) == len(sources)
    assert sorted(w["value"]["source"] for w in wakes) == sorted(sources)
    assert all(w["value"]["timeout"] is True for w in wakes)

    # A burst appended through both processes is one debounced batch.
    burst_observer = await spawn_url(http, second, NOTE_TYPE)
    await register_wake(
        http,
        second,
        subscriberUrl=burst_observer,
        sourceUrl=sources[0],
        condition={"on": "change"},
        debounceMs=1000,
    )
    assert first.database_url is not None
    db = await asyncpg.connect(first.database_url)
    try:
        token = await mint_token(db, sources[0])
    finally:
        await db.close()
    await asyncio.gather(
        *(
            append(http, (first, second)[i % 2], f"{sources[0]}/main", [note(f"b{i}")], token)
            for i in range(10)
        )
    )
    (batch,) = await wait_for_wakes(http, first, burst_observer, 1)
    assert sorted(c["key"] for c in batch["value"]["changes"]) == sorted(f"b{i}" for i in range(10))


# --- manifest entries -----------------------------------------------------------------------


def manifest(key: str, operation: str, value: dict[str, Any] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "manifest", "key": key, "headers": {"operation": operation}}
    if value is not None:
        event["value"] = value
    return event


async def test_manifest_entries_register_replace_and_remove_their_wake(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    owner = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    owner_token = await mint_token(db, owner)
    source_token = await mint_token(db, source)
    key = f"observe:{source}"
    entry = {"kind": "observe", "entity_url": source, "wake": {"on": "change", "ops": ["insert"]}}
    await append(http, server, f"{owner}/main", [manifest(key, "insert", entry)], owner_token)
    (row,) = await registrations(db, owner)
    assert (row["source_url"], row["manifest_key"]) == (source, key)
    assert orjson.loads(row["condition"]) == {"on": "change", "ops": ["insert"]}

    changed = {**entry, "wake": {"on": "change", "ops": ["update"], "debounceMs": "x"}}
    await append(http, server, f"{owner}/main", [manifest(key, "update", changed)], owner_token)
    (row,) = await registrations(db, owner)
    assert orjson.loads(row["condition"]) == {"on": "change", "ops": ["update"]}
    assert row["debounce_ms"] == 0
    await append(http, server, f"{source}/main", [note("n")], source_token)
    assert await wakes_in(http, server, owner) == []
    await append(http, server, f"{source}/main", [note("n", operation="update")], source_token)
    assert len(await wakes_in(http, server, owner)) == 1

    await append(http, server, f"{owner}/main", [manifest(key, "delete")], owner_token)
    assert await registrations(db, owner) == []
    # An entry without a wake registers nothing.
    plain = {"kind": "observe", "entity_url": source}
    await append(http, server, f"{owner}/main", [manifest(key, "insert", plain)], owner_token)
    assert await registrations(db, owner) == []


async def test_spawn_wake_and_child_manifest_entry_share_one_registration(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The 0.4.8 fix (spec/03 §4.13): the runtime's spawn-time wake and its `child:` entry
    carry the same manifest key, so one run wakes the parent once."""
    parent = await spawn_url(http, server, NOTE_TYPE)
    child_id = unique_id("c")
    key = f"child:{NOTE_TYPE}:{child_id}"
    spawned = await http.put(
        f"{server.origin}/_electric/entities/{NOTE_TYPE}/{child_id}",
        json={
            "parent": parent,
            "wake": {"subscriberUrl": parent, "condition": "runFinished", "manifestKey": key},
        },
    )
    assert spawned.status_code == 201, spawned.text
    child = spawned.json()["url"]
    entry = {
        "kind": "child",
        "id": child_id,
        "entity_type": NOTE_TYPE,
        "entity_url": child,
        "wake": {"on": "runFinished", "includeResponse": False},
        "observed": True,
    }
    parent_token = await mint_token(db, parent)
    await append(http, server, f"{parent}/main", [manifest(key, "insert", entry)], parent_token)
    (row,) = await registrations(db, parent)
    assert (row["source_url"], row["manifest_key"], row["include_response"]) == (child, key, False)
    child_token = await mint_token(db, child)
    run = {"type": "run", "key": "r1", "value": {"status": "completed"}}
    await append(
        http, server, f"{child}/main", [{**run, "headers": {"operation": "update"}}], child_token
    )
    (wake,) = await wakes_in(http, server, parent)
    assert wake["value"]["finished_child"] == {
        "url": child,
        "type": NOTE_TYPE,
        "run_status": "completed",
    }


async def test_shared_state_manifest_entry_watches_the_shared_state_stream(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    owner = await spawn_url(http, server, NOTE_TYPE)
    shared_id = unique_id("db")
    path = f"/_electric/shared-state/{shared_id}"
    assert (await http.put(f"{server.origin}{path}", headers=JSON)).status_code == 201
    entry = {
        "kind": "shared-state",
        "id": shared_id,
        "mode": "create",
        "collections": {"items": {"type": "items", "primaryKey": "id"}},
        "wake": {"on": "change", "collections": ["items"]},
    }
    token = await mint_token(db, owner)
    await append(
        http,
        server,
        f"{owner}/main",
        [manifest(f"shared-state:{shared_id}", "insert", entry)],
        token,
    )
    await append(http, server, path, [note("i1", event_type="items")])
    (wake,) = await wakes_in(http, server, owner)
    assert wake["value"]["source"] == path


async def test_refused_source_append_wakes_no_one(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http,
        server,
        subscriberUrl=observer,
        sourceUrl=source,
        condition={"on": "change"},
        debounceMs=50,
    )
    token = await mint_token(db, source)
    producer = {"Producer-Id": "p", "Producer-Epoch": "3", "Producer-Seq": "0"}
    await append(http, server, f"{source}/main", [note("first")], token, producer)
    stale = {**producer, "Producer-Epoch": "1"}
    fenced = await http.post(
        f"{server.origin}{source}/main",
        content=orjson.dumps([note("fenced")]),
        headers={**JSON, **stale, "authorization": f"Bearer {token}"},
    )
    assert fenced.status_code == 403, fenced.text
    (wake,) = await wait_for_wakes(http, server, observer, 1)
    assert [c["key"] for c in wake["value"]["changes"]] == ["first"]
    assert await db.fetchval("SELECT count(*) FROM wake_debounce_buffers") == 0


async def test_event_with_a_very_long_key_still_wakes_and_appends(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    """The wake's producer id embeds the source event key; a key longer than an index row
    must neither fail the source append nor lose the wake."""
    observer = await spawn_url(http, server, NOTE_TYPE)
    source = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http, server, subscriberUrl=observer, sourceUrl=source, condition={"on": "change"}
    )
    token = await mint_token(db, source)
    long_key = secrets.token_urlsafe(6000)  # incompressible
    for _ in range(2):  # the retry of the same event is still deduplicated
        await append(http, server, f"{source}/main", [note(long_key)], token)
    (wake,) = await wakes_in(http, server, observer)
    assert wake["value"]["changes"] == [{"collection": "note", "kind": "insert", "key": long_key}]
    assert wake["key"].endswith(f"-insert:{long_key}")


async def test_self_observation_does_not_cascade(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    entity = await spawn_url(http, server, NOTE_TYPE)
    await register_wake(
        http, server, subscriberUrl=entity, sourceUrl=entity, condition={"on": "change"}
    )
    token = await mint_token(db, entity)
    await append(http, server, f"{entity}/main", [note("a"), note("b")], token)
    wakes = await wakes_in(http, server, entity)
    assert [w["value"]["changes"][0]["key"] for w in wakes] == ["a", "b"]


async def test_registrations_too_large_to_index_are_4xx_or_skipped_never_500(
    server: ServerProcess, http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    huge = "/" + secrets.token_urlsafe(4000)  # incompressible, beyond an index row
    owner = await spawn_url(http, server, NOTE_TYPE)
    response = await register_wake(
        http, server, subscriberUrl=owner, sourceUrl=huge, condition="runFinished"
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"
    # A spawn asking for such a wake is refused as a whole.
    child_id = unique_id("c")
    spawned = await http.put(
        f"{server.origin}/_electric/entities/{NOTE_TYPE}/{child_id}",
        json={"wake": {"subscriberUrl": huge, "condition": "runFinished"}},
    )
    assert spawned.status_code == 400, spawned.text
    gone = await http.get(f"{server.origin}/_electric/entities/{NOTE_TYPE}/{child_id}")
    assert gone.status_code == 404
    # A manifest entry naming such a source keeps the append and registers nothing.
    token = await mint_token(db, owner)
    entry = {"kind": "observe", "entity_url": huge, "wake": "runFinished"}
    await append(http, server, f"{owner}/main", [manifest("observe:huge", "insert", entry)], token)
    assert await registrations(db, owner) == []
    assert (await read_events(http, server, f"{owner}/main"))[-1]["key"] == "observe:huge"

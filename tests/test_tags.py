"""Entity tags and the tag outbox (spec/02 §3.4, spec/03 §5.5) over HTTP against real
`electric-agents serve` processes: the write-token and status checks, the row, and the
`tags` events the outbox drainer appends to the main stream: each committed change exactly
once, in commit order per entity, across two processes, retries and a kill -9.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from agents_support import (
    TENANT,
    mint_token,
    module_serve_server,
    read_events,
    set_status,
    unique_id,
)
from conftest import ServerFactory, ServerProcess

pytestmark = pytest.mark.timeout(180)

DRAIN_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("tags"))


async def connect(server: ServerProcess) -> Any:
    assert server.database_url is not None
    return await asyncpg.connect(server.database_url)


# --- helpers -------------------------------------------------------------------------------


async def new_entity(http: httpx.AsyncClient, server: ServerProcess) -> str:
    kind = unique_id("tagged").replace("-", "_")
    registered = await http.post(
        server.origin + "/_electric/entity-types", json={"name": kind, "description": "t"}
    )
    assert registered.status_code == 201, registered.text
    url = f"/{kind}/{unique_id()}"
    spawned = await http.put(server.origin + f"/_electric/entities{url}", json={})
    assert spawned.status_code == 201, spawned.text
    return url


def claim(token: str) -> dict[str, str]:
    return {"electric-claim-token": token}


async def set_tag(
    http: httpx.AsyncClient,
    server: ServerProcess,
    url: str,
    key: str,
    value: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await http.post(
        server.origin + f"/_electric/entities{url}/tags/{key}",
        json={"value": value},
        headers=headers or {},
    )


async def remove_tag(
    http: httpx.AsyncClient,
    server: ServerProcess,
    url: str,
    key: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await http.delete(
        server.origin + f"/_electric/entities{url}/tags/{key}", headers=headers or {}
    )


async def tag_events(http: httpx.AsyncClient, server: ServerProcess, url: str) -> list[Any]:
    return [e for e in await read_events(http, server, url + "/main") if e.get("type") == "tags"]


async def wait_for_outbox(db: Any, *, empty_for: list[str] | None = None) -> None:
    """Until no live outbox row is left (for `empty_for` entities, or at all)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        left = await db.fetchval(
            """
            SELECT count(*) FROM tag_stream_outbox
            WHERE dead_lettered_at IS NULL AND ($1::text[] IS NULL OR entity_url = ANY($1))
            """,
            empty_for,
        )
        if left == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the tag outbox was not drained")


def replay(events: list[Any]) -> dict[str, str]:
    """Fold `tags` events into the tag map, refusing any event that is not a change of the
    state so far: a duplicated or reordered event breaks this."""
    tags: dict[str, str] = {}
    for event in events:
        key, op = event["key"], event["headers"]["operation"]
        if op == "insert":
            assert key not in tags, f"insert of present tag {key}: {event}"
        elif op == "update":
            assert key in tags and tags[key] != event["value"]["value"], event
        else:
            assert op == "delete" and key in tags, f"delete of absent tag {key}: {event}"
            del tags[key]
            continue
        assert event["value"] == {"key": key, "value": event["value"]["value"]}
        tags[key] = event["value"]["value"]
    return tags


async def row_tags(db: Any, url: str) -> dict[str, str]:
    tags = await db.fetchval(
        "SELECT tags::text FROM entities WHERE tenant_id = $1 AND url = $2", TENANT, url
    )
    import json

    parsed: dict[str, str] = json.loads(tags)
    return parsed


# --- the routes --------------------------------------------------------------------------------


async def test_tag_writes_need_the_entitys_claim_write_token(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    url = await new_entity(http, server)
    for headers in ({}, claim("wrong"), {"authorization": "Bearer wrong"}):
        response = await set_tag(http, server, url, "k", "v", headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == {
            "code": "UNAUTHORIZED",
            "message": "Invalid write token",
        }
        assert (await remove_tag(http, server, url, "k", headers)).status_code == 401
    token = await mint_token(db, url)
    ok = await set_tag(http, server, url, "k", "v", {"authorization": f"bearer {token}"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["tags"] == {"k": "v"}
    # Token before status: a killed entity without the token is still a 401.
    await set_status(db, url, "killed")
    assert (await set_tag(http, server, url, "k", "w")).status_code == 401
    refused = await set_tag(http, server, url, "k", "w", claim(token))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "NOT_RUNNING"
    assert (await remove_tag(http, server, url, "k", claim(token))).status_code == 409


async def test_tag_changes_update_the_row_and_reach_the_main_stream_in_order(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    url = await new_entity(http, server)
    headers = claim(await mint_token(db, url))
    steps = [
        ("set", "colour", "red", {"colour": "red"}),
        ("set", "size", "L", {"colour": "red", "size": "L"}),
        ("set", "colour", "blue", {"colour": "blue", "size": "L"}),
        ("set", "colour", "blue", {"colour": "blue", "size": "L"}),  # no change
        ("del", "size", None, {"colour": "blue"}),
        ("del", "size", None, {"colour": "blue"}),  # absent: no change
        ("set", "a%2Fb", "x", {"a/b": "x", "colour": "blue"}),
    ]
    updated_at = 0
    for action, key, value, expected in steps:
        if action == "set":
            assert value is not None
            response = await set_tag(http, server, url, key, value, headers)
        else:
            response = await remove_tag(http, server, url, key, headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tags"] == expected and body["url"] == url
        assert body["updated_at"] >= updated_at
        updated_at = body["updated_at"]
    await wait_for_outbox(db, empty_for=[url])
    events = await tag_events(http, server, url)
    assert [(e["headers"]["operation"], e["key"]) for e in events] == [
        ("insert", "colour"),
        ("insert", "size"),
        ("update", "colour"),
        ("delete", "size"),
        ("insert", "a/b"),
    ]
    assert events[0]["value"] == {"key": "colour", "value": "red"}
    assert "value" not in events[3]
    assert events[0]["headers"]["timestamp"].endswith("Z")
    assert replay(events) == await row_tags(db, url) == {"a/b": "x", "colour": "blue"}
    index = await db.fetchval("SELECT tags_index FROM entities WHERE url = $1", url)
    assert index == ['["a/b","x"]', '["colour","blue"]']


async def test_a_failing_change_holds_back_its_entitys_later_changes_and_is_retried(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    """A row that fails to drain (here: a trigger refuses its deletion) is retried with
    backoff; the entity's later rows wait behind it, other entities' rows do not."""
    stuck, other = await new_entity(http, server), await new_entity(http, server)
    stuck_headers = claim(await mint_token(db, stuck))
    other_headers = claim(await mint_token(db, other))
    marker = unique_id("flaky")
    function = f"refuse_{marker.replace('-', '_')}"
    await db.execute(
        f"""
        CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
        CREATE TRIGGER {function} BEFORE DELETE ON tag_stream_outbox
        FOR EACH ROW WHEN (OLD.key = '{marker}') EXECUTE FUNCTION {function}();
        """
    )
    try:
        assert (await set_tag(http, server, stuck, "first", "1", stuck_headers)).status_code == 200
        assert (await set_tag(http, server, stuck, marker, "2", stuck_headers)).status_code == 200
        assert (await set_tag(http, server, stuck, "third", "3", stuck_headers)).status_code == 200
        assert (await set_tag(http, server, other, "o", "1", other_headers)).status_code == 200
        await wait_for_outbox(db, empty_for=[other])
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            failed = await db.fetchrow(
                "SELECT attempt_count, last_error, next_attempt_at > now() AS waiting,"
                " dead_lettered_at FROM tag_stream_outbox WHERE key = $1",
                marker,
            )
            if failed["attempt_count"] >= 2:
                break
            await asyncio.sleep(0.05)
        assert failed["attempt_count"] >= 2 and failed["dead_lettered_at"] is None
        assert "refused for the test" in failed["last_error"]
        behind = await db.fetchrow(
            "SELECT attempt_count FROM tag_stream_outbox WHERE entity_url = $1 AND key = 'third'",
            stuck,
        )
        assert behind["attempt_count"] == 0
        assert [e["key"] for e in await tag_events(http, server, stuck)] == ["first"]
    finally:
        await db.execute(
            f"DROP TRIGGER {function} ON tag_stream_outbox; DROP FUNCTION {function}();"
        )
    await wait_for_outbox(db, empty_for=[stuck])
    assert [e["key"] for e in await tag_events(http, server, stuck)] == ["first", marker, "third"]


async def test_changes_to_a_closed_stream_are_dead_lettered_without_retries(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    url = await new_entity(http, server)
    killed = await http.post(
        server.origin + f"/_electric/entities{url}/signal", json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    # A change that committed just before the kill: its stream is closed now.
    await db.execute(
        """
        INSERT INTO tag_stream_outbox (tenant_id, entity_url, collection, op, key, row_data)
        VALUES ($1, $2, 'tags', 'insert', 'late', '{"key":"late","value":"v"}')
        """,
        TENANT,
        url,
    )
    await wait_for_outbox(db, empty_for=[url])
    row = await db.fetchrow(
        "SELECT attempt_count, last_error FROM tag_stream_outbox WHERE entity_url = $1", url
    )
    assert row["attempt_count"] == 1 and "STREAM_CLOSED" in row["last_error"]
    assert await tag_events(http, server, url) == []


# --- concurrency and crashes ---------------------------------------------------------------


async def hammer(
    http: httpx.AsyncClient,
    servers: list[ServerProcess],
    entities: dict[str, dict[str, str]],
    *,
    writes: int,
    acknowledged: list[tuple[str, str, str]],
    stop: asyncio.Event | None = None,
) -> None:
    """`writes` random tag changes (few keys, so they collide), 16 at a time, spread over
    the servers; the (entity, key, value) of each acknowledged set goes to `acknowledged`."""
    counter = itertools.count()
    rng = random.Random(7)
    semaphore = asyncio.Semaphore(16)

    async def one(n: int) -> None:
        url = rng.choice(list(entities))
        server = servers[n % len(servers)]
        key = rng.choice(["a", "b", "c"])
        async with semaphore:
            if stop is not None and stop.is_set():
                return
            try:
                if rng.random() < 0.25:
                    response = await remove_tag(http, server, url, key, entities[url])
                else:
                    value = f"v{next(counter)}"
                    response = await set_tag(http, server, url, key, value, entities[url])
                    if response.status_code == 200:
                        acknowledged.append((url, key, value))
            except httpx.TransportError:
                return  # the server was killed under this request
            assert response.status_code == 200, response.text

    await asyncio.gather(*(one(n) for n in range(writes)))


async def check_streams(
    http: httpx.AsyncClient,
    server: ServerProcess,
    db: Any,
    entities: dict[str, dict[str, str]],
    acknowledged: list[tuple[str, str, str]],
) -> None:
    await wait_for_outbox(db)
    assert await db.fetchval("SELECT count(*) FROM tag_stream_outbox") == 0, "dead letters"
    for url in entities:
        events = await tag_events(http, server, url)
        assert replay(events) == await row_tags(db, url)
        sets = [(url, e["key"], e["value"]["value"]) for e in events if "value" in e]
        assert len(sets) == len(set(sets)), "a change was appended twice"
        missing = {a for a in acknowledged if a[0] == url} - set(sets)
        assert not missing, f"acknowledged changes missing from the stream: {missing}"


async def test_concurrent_changes_through_two_processes_arrive_once_in_commit_order(
    http: httpx.AsyncClient, server_factory: ServerFactory
) -> None:
    first = server_factory("serve")
    second = server_factory("serve")
    db = await connect(first)
    try:
        entities = {}
        for _ in range(3):
            url = await new_entity(http, first)
            entities[url] = claim(await mint_token(db, url))
        acknowledged: list[tuple[str, str, str]] = []
        await hammer(http, [first, second], entities, writes=300, acknowledged=acknowledged)
        await check_streams(http, first, db, entities, acknowledged)
    finally:
        await db.close()


async def test_kill_9_while_draining_loses_and_duplicates_no_change(
    http: httpx.AsyncClient, server_factory: ServerFactory
) -> None:
    server = server_factory("serve")
    db = await connect(server)
    try:
        entities = {}
        for _ in range(4):
            url = await new_entity(http, server)
            entities[url] = claim(await mint_token(db, url))
        acknowledged: list[tuple[str, str, str]] = []
        stop = asyncio.Event()
        load = asyncio.create_task(
            hammer(http, [server], entities, writes=2000, acknowledged=acknowledged, stop=stop)
        )
        # Kill once the drainer is busy: changes are committed and being appended.
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while len(acknowledged) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        server.kill9()
        stop.set()
        await load
        pending = await db.fetchval("SELECT count(*) FROM tag_stream_outbox")
        server.start()
        await check_streams(http, server, db, entities, acknowledged)
        assert len(acknowledged) >= 200, len(acknowledged)
        del pending  # informative only: how much the restart had left to drain
    finally:
        await db.close()


async def test_a_drain_killed_mid_transaction_is_redone_whole_after_restart(
    http: httpx.AsyncClient, server_factory: ServerFactory
) -> None:
    """The drainer appends an entity's rows in one transaction; a kill -9 while it is
    stuck on the third row (a trigger sleeps) leaves nothing appended, and the restarted
    server appends all four once, in order."""
    server = server_factory("serve")
    db = await connect(server)
    try:
        url = await new_entity(http, server)
        await db.execute(
            """
            CREATE FUNCTION slow_tag_delete() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_sleep(3); RETURN OLD; END $$;
            CREATE TRIGGER slow_tag_delete BEFORE DELETE ON tag_stream_outbox
            FOR EACH ROW WHEN (OLD.key = 'slow') EXECUTE FUNCTION slow_tag_delete();
            """
        )
        keys = ["one", "two", "slow", "four"]
        async with db.transaction():  # four changes that committed together
            for key in keys:
                await db.execute(
                    """
                    INSERT INTO tag_stream_outbox (tenant_id, entity_url, collection, op, key,
                                                   row_data)
                    VALUES ($1, $2, 'tags', 'insert', $3, jsonb_build_object('key', $3::text,
                                                                             'value', 'v'))
                    """,
                    TENANT,
                    url,
                    key,
                )
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            sleeping = await db.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'DELETE FROM tag_stream%'"
                " AND wait_event = 'PgSleep'"
            )
            if sleeping:
                break
            await asyncio.sleep(0.02)
        assert sleeping, "the drainer never reached the slow row"
        server.kill9()
        assert (
            await db.fetchval("SELECT count(*) FROM tag_stream_outbox WHERE entity_url = $1", url)
            == 4
        )
        # Waits for the killed server's transaction to end (it held the rows).
        await db.execute("DROP TRIGGER slow_tag_delete ON tag_stream_outbox")
        stored = await db.fetchval(
            "SELECT count(*) FROM ds_messages m JOIN ds_streams s ON s.id = m.stream_id"
            " WHERE s.path = $1",
            url.lstrip("/") + "/main",
        )
        assert stored == 1, "only entity_created: the killed drain's appends rolled back"
        server.start()
        await wait_for_outbox(db, empty_for=[url])
        events = await tag_events(http, server, url)
        assert [e["key"] for e in events] == keys
    finally:
        await db.close()

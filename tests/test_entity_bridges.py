"""Entity membership streams (`POST /_electric/entities/register`, `/_entities/<ref>`,
spec/02 §3.4, spec/03 §3.5.9, §5.10) against real `electric-agents serve` processes: the
source ref the TypeScript runtime computes, current members on registration, and one
`members` event per committed change (spawn, tags, status), across two processes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from agents_support import (
    eventually,
    mint_token,
    module_serve_server,
    new_type,
    spawn_entity,
)
from conftest import ServerFactory, ServerProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("bridges"))


# --- helpers -------------------------------------------------------------------------------


async def register(
    http: httpx.AsyncClient, server: ServerProcess, tags: dict[str, str]
) -> dict[str, Any]:
    answer = await http.post(server.origin + "/_electric/entities/register", json={"tags": tags})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def members_events(
    http: httpx.AsyncClient, server: ServerProcess, stream_url: str
) -> list[dict[str, Any]]:
    answer = await http.get(server.origin + stream_url, params={"offset": "-1"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def membership(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replay `members` events the way an observer does."""
    members: dict[str, dict[str, Any]] = {}
    for event in events:
        assert event["type"] == "members"
        if event["headers"]["operation"] == "delete":
            assert event["key"] in members, f"delete of a non-member: {event}"
            del members[event["key"]]
        else:
            expected_op = "update" if event["key"] in members else "insert"
            assert event["headers"]["operation"] == expected_op, event
            members[event["key"]] = event["value"]
    return members


async def wait_for_members(
    http: httpx.AsyncClient, server: ServerProcess, stream_url: str, expected: dict[str, str]
) -> list[dict[str, Any]]:
    """Wait until the stream's members are exactly `expected` (url -> status)."""
    events: list[dict[str, Any]] = []

    async def settled() -> bool:
        nonlocal events
        events = await members_events(http, server, stream_url)
        found = {url: row["status"] for url, row in membership(events).items()}
        return found == expected

    await eventually(settled, f"members of {stream_url} to be {expected}")
    return events


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "ref"),
    [
        # Values computed with the TypeScript runtime's algorithm in Node: FNV-1a 64 over
        # the UTF-16 code units of JSON.stringify of the key-sorted tags.
        ({}, "08f44b07b5901a25"),
        ({"team": "a"}, "9fb13cabc8e102d1"),
        ({"b": "1", "a": "2", "10": "x", "2": "y"}, "9659f522a14a7c97"),
        ({"ключ": "😀 é"}, "e8d16d6cdc78e909"),
    ],
)
async def test_source_ref_matches_the_typescript_runtime(
    http: httpx.AsyncClient, server: ServerProcess, tags: dict[str, str], ref: str
) -> None:
    answer = await http.post(server.origin + "/_electric/entities/register", json={"tags": tags})
    assert answer.status_code == 200
    assert list(answer.json().items()) == [("sourceRef", ref), ("streamUrl", f"/_entities/{ref}")]
    head = await http.head(server.origin + f"/_entities/{ref}")
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("application/json")


async def test_registration_lists_current_members_only(
    http: httpx.AsyncClient, server: ServerProcess
) -> None:
    kind = await new_type(http, server, "member")
    team = uuid.uuid4().hex
    inside = (await spawn_entity(http, server, kind, tags={"team": team, "role": "worker"}))["url"]
    also_inside = (await spawn_entity(http, server, kind, tags={"team": team}))["url"]
    (await spawn_entity(http, server, kind, tags={"team": "other"}))["url"]
    (await spawn_entity(http, server, kind, tags={}))["url"]

    source = await register(http, server, {"team": team})
    events = await members_events(http, server, source["streamUrl"])
    assert {event["key"] for event in events} == {inside, also_inside}
    row = next(event["value"] for event in events if event["key"] == inside)
    assert list(row) == [
        "url",
        "type",
        "status",
        "tags",
        "spawn_args",
        "parent",
        "type_revision",
        "inbox_schemas",
        "state_schemas",
        "created_at",
        "updated_at",
    ]
    assert row["type"] == kind and row["status"] == "idle"
    assert row["tags"] == {"role": "worker", "team": team}
    assert row["spawn_args"] == {} and row["parent"] is None
    assert isinstance(row["created_at"], int)
    assert all(event["headers"]["operation"] == "insert" for event in events)

    # Registering again changes nothing.
    assert await register(http, server, {"team": team}) == source
    await asyncio.sleep(0.3)
    assert await members_events(http, server, source["streamUrl"]) == events


async def test_changes_after_registration_become_members_events(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    kind = await new_type(http, server, "member")
    team = uuid.uuid4().hex
    source = await register(http, server, {"team": team})
    stream = source["streamUrl"]

    first = (await spawn_entity(http, server, kind, tags={"team": team}))["url"]
    outsider = (await spawn_entity(http, server, kind, tags={}))["url"]
    await wait_for_members(http, server, stream, {first: "idle"})

    # A tag that makes an entity match brings it in; removing it takes it out.
    token = await mint_token(db, outsider)
    base = server.origin + f"/_electric/entities{outsider}/tags/team"
    claim = {"electric-claim-token": token}
    tagged = await http.post(base, json={"value": team}, headers=claim)
    assert tagged.status_code == 200, tagged.text
    await wait_for_members(http, server, stream, {first: "idle", outsider: "idle"})

    untagged = await http.delete(base, headers=claim)
    assert untagged.status_code == 200, untagged.text
    events = await wait_for_members(http, server, stream, {first: "idle"})
    removal = events[-1]
    assert removal["headers"]["operation"] == "delete" and removal["key"] == outsider
    assert "value" not in removal and removal["old_value"]["tags"] == {"team": team}

    # Status changes are updates of the row.
    stopped = await http.post(
        server.origin + f"/_electric/entities{first}/signal", json={"signal": "SIGSTOP"}
    )
    assert stopped.status_code == 200, stopped.text
    await wait_for_members(http, server, stream, {first: "paused"})
    killed = await http.post(
        server.origin + f"/_electric/entities{first}/signal", json={"signal": "SIGKILL"}
    )
    assert killed.status_code == 200, killed.text
    events = await wait_for_members(http, server, stream, {first: "killed"})
    # Every event says something new about its entity.
    last: dict[str, Any] = {}
    for event in events:
        value = event.get("value", event.get("old_value"))
        assert last.get(event["key"]) != (event["headers"]["operation"], value)
        last[event["key"]] = (event["headers"]["operation"], value)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"tags": []}',
        b'{"tags": "team"}',
        b'{"tags": {"team": 1}}',
        b'{"tags": {"team": null}}',
        b"[]",
    ],
)
async def test_bad_registrations_are_400(
    http: httpx.AsyncClient, server: ServerProcess, db: Any, body: bytes
) -> None:
    before = await db.fetchval("SELECT count(*) FROM entity_bridges")
    answer = await http.post(
        server.origin + "/_electric/entities/register",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "INVALID_REQUEST"
    assert await db.fetchval("SELECT count(*) FROM entity_bridges") == before


async def test_empty_body_registers_everything(
    http: httpx.AsyncClient, server: ServerProcess
) -> None:
    answer = await http.post(server.origin + "/_electric/entities/register")
    assert answer.status_code == 200, answer.text
    assert answer.json()["sourceRef"] == "08f44b07b5901a25"


async def test_two_processes_write_each_change_once(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    """Changes made through either process reach the bridge once each, in order per
    entity, whichever process's drainer takes them."""
    first = server_factory("serve")
    second = server_factory("serve", database_url=first.database_url)
    kind = await new_type(http, first, "member")
    team = uuid.uuid4().hex
    source = await register(http, first, {"team": team})

    async def churn(server: ServerProcess) -> str:
        url = (await spawn_entity(http, server, kind, tags={"team": team}))["url"]
        for signal in ("SIGSTOP", "SIGCONT", "SIGSTOP"):
            answer = await http.post(
                server.origin + f"/_electric/entities{url}/signal", json={"signal": signal}
            )
            assert answer.status_code == 200, answer.text
        return url

    urls = await asyncio.gather(*(churn(s) for s in [first, second] * 5))
    expected = dict.fromkeys(urls, "paused")
    await wait_for_members(http, second, source["streamUrl"], expected)
    events = await members_events(http, first, source["streamUrl"])
    # No duplicate: consecutive events of an entity always differ.
    last: dict[str, Any] = {}
    for event in events:
        value = event.get("value", event.get("old_value"))
        assert last.get(event["key"]) != value, f"duplicate event {event}"
        last[event["key"]] = value


async def test_changes_queued_while_the_server_is_down_are_written_after_restart(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    """The queue is a table written by the changing transaction: a change committed while
    no server runs (here straight in SQL after a kill -9) is drained by the next start."""
    server = server_factory("serve")
    kind = await new_type(http, server, "member")
    team = uuid.uuid4().hex
    source = await register(http, server, {"team": team})
    url = (await spawn_entity(http, server, kind, tags={"team": team}))["url"]
    await wait_for_members(http, server, source["streamUrl"], {url: "idle"})

    server.kill9()
    assert server.database_url is not None
    conn = await asyncpg.connect(server.database_url)
    try:
        await conn.execute("UPDATE entities SET status = 'paused' WHERE url = $1", url)
        assert await conn.fetchval("SELECT count(*) FROM entity_membership_outbox") == 1
    finally:
        await conn.close()
    server.restart()
    events = await wait_for_members(http, server, source["streamUrl"], {url: "paused"})
    assert [event["headers"]["operation"] for event in events] == ["insert", "update"]


async def test_membership_changes_wake_observers(
    http: httpx.AsyncClient, server: ServerProcess
) -> None:
    """An `entities({tags})` observer with a wake is woken by each membership change, in the
    drainer's transaction."""
    kind = await new_type(http, server, "member")
    observer = (await spawn_entity(http, server, kind, tags={}))["url"]
    team = uuid.uuid4().hex
    source = await register(http, server, {"team": team})
    registered = await http.post(
        server.origin + "/_electric/wake",
        json={
            "subscriberUrl": observer,
            "sourceUrl": source["streamUrl"],
            "condition": {"on": "change", "collections": ["members"], "ops": ["insert"]},
        },
    )
    assert registered.status_code == 204, registered.text
    member = (await spawn_entity(http, server, kind, tags={"team": team}))["url"]

    async def woken() -> bool:
        stream = await members_events(http, server, f"{observer}/main")
        return any(event.get("type") == "wake" for event in stream)

    await eventually(woken, f"a wake on {observer}")
    wakes = [
        e for e in await members_events(http, server, f"{observer}/main") if e["type"] == "wake"
    ]
    assert len(wakes) == 1
    assert wakes[0]["value"]["source"] == source["streamUrl"]
    assert wakes[0]["value"]["changes"] == [
        {"collection": "members", "kind": "insert", "key": member}
    ]

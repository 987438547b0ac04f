"""Subtree fork (`POST …/fork`, spec/02 §3.4, spec/03 §5.4) against a real `electric-agents
serve`: a three-level subtree with manifests, child status rows and shared state forked
copy-on-write with its reconciliation events; naming; waiting for a quiet subtree; every
error; and a failure half-way that leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agents_support import (
    TENANT,
    mint_token,
    module_serve_server,
    new_type,
    read_events,
    set_status,
    spawn_entity,
    unique_id,
)
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("fork"))


@pytest.fixture
async def kind(http: httpx.AsyncClient, server: ServerProcess) -> str:
    return await new_type(http, server, "forkable")


# --- helpers -------------------------------------------------------------------------------


async def append(
    http: httpx.AsyncClient, server: ServerProcess, db: Any, url: str, *events: dict[str, Any]
) -> None:
    token = await mint_token(db, url)
    answer = await http.post(
        server.origin + f"{url}/main",
        json=list(events),
        headers={"electric-claim-token": token},
    )
    assert answer.status_code in (200, 204), answer.text


def manifest_child(child: dict[str, Any]) -> dict[str, Any]:
    _, child_type, child_id = child["url"].split("/")
    key = f"child:{child_type}:{child_id}"
    return {
        "type": "manifest",
        "key": key,
        "value": {
            "key": key,
            "kind": "child",
            "id": child_id,
            "entity_type": child_type,
            "entity_url": child["url"],
            "observed": True,
        },
        "headers": {"operation": "insert"},
    }


def child_status(child: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "child_status",
        "key": f"child-{child['url']}",
        "value": {"entity_url": child["url"], "entity_type": child["type"], "status": "idle"},
        "headers": {"operation": "insert"},
    }


async def fork(
    http: httpx.AsyncClient, server: ServerProcess, url: str, **body: Any
) -> httpx.Response:
    return await http.post(server.origin + f"/_electric/entities{url}/fork", json=body)


async def stream_exists(http: httpx.AsyncClient, server: ServerProcess, path: str) -> bool:
    return (await http.head(server.origin + path)).status_code == 200


# --- tests ---------------------------------------------------------------------------------


async def test_three_level_subtree_forks_with_reconciliation_events(
    http: httpx.AsyncClient, server: ServerProcess, db: Any, kind: str
) -> None:
    root = await spawn_entity(http, server, kind, tags={"team": "a"})
    child = await spawn_entity(http, server, kind, parent=root["url"], args={"boss": root["url"]})
    grandchild = await spawn_entity(http, server, kind, parent=child["url"])
    shared_id = unique_id("board")
    shared_path = f"/_electric/shared-state/{shared_id}"
    created = await http.put(
        server.origin + shared_path,
        content=b'[{"type":"note","key":"n1","value":1,"headers":{"operation":"insert"}}]',
        headers={"content-type": "application/json"},
    )
    assert created.status_code == 201, created.text
    shared_entry = {
        "type": "manifest",
        "key": f"shared-state:{shared_id}",
        "value": {"key": f"shared-state:{shared_id}", "kind": "shared-state", "id": shared_id},
        "headers": {"operation": "insert"},
    }
    await append(http, server, db, root["url"], manifest_child(child), child_status(child))
    await append(http, server, db, root["url"], shared_entry)
    await append(http, server, db, child["url"], manifest_child(grandchild))
    source_history = {
        url: await read_events(http, server, f"{url}/main")
        for url in (root["url"], child["url"], grandchild["url"])
    }

    answer = await fork(http, server, root["url"])
    assert answer.status_code == 201, answer.text
    body = answer.json()
    forks = body["entities"]
    assert body["root"] == forks[0] and len(forks) == 3
    suffix = re.fullmatch(rf"/{kind}/[\w-]+-fork-([0-9a-f]{{8}})", forks[0]["url"])
    assert suffix is not None, forks[0]["url"]
    for source, forked in zip([root, child, grandchild], forks, strict=True):
        assert forked["url"] == f"{source['url']}-fork-{suffix.group(1)}"
        assert forked["status"] == "idle" and forked["type"] == kind
        assert forked["tags"] == source["tags"]
    assert "parent" not in forks[0]
    assert forks[1]["parent"] == forks[0]["url"] and forks[2]["parent"] == forks[1]["url"]
    assert forks[1]["spawn_args"] == {"boss": forks[0]["url"]}  # remapped exact strings

    # Each fork holds its source's history, then the reconciliation events.
    txids = set()
    for source, forked in zip([root, child, grandchild], forks, strict=True):
        history = source_history[source["url"]]
        events = await read_events(http, server, f"{forked['url']}/main")
        assert events[: len(history)] == history
        added = events[len(history) :]
        assert added[0]["type"] == "entity_created"
        assert added[0]["headers"]["operation"] == "update"
        assert added[0]["headers"]["forkedFrom"] == source["url"]
        txids.update(event["headers"]["txid"] for event in added)
        expected_parent = forked.get("parent")
        assert added[0]["value"].get("parent_url") == expected_parent
    assert len(txids) == 1 and txids.pop().startswith("fork-")

    root_added = (await read_events(http, server, f"{forks[0]['url']}/main"))[
        len(source_history[root["url"]]) :
    ]
    by_op = [(e["type"], e["key"], e["headers"]["operation"]) for e in root_added]
    old_child_key = manifest_child(child)["key"]
    new_child_id = forks[1]["url"].split("/")[2]
    new_child_key = f"child:{kind}:{new_child_id}"
    assert ("manifest", old_child_key, "delete") in by_op
    assert ("manifest", new_child_key, "insert") in by_op
    inserted = next(e for e in root_added if e["key"] == new_child_key)
    assert inserted["value"]["entity_url"] == forks[1]["url"]
    assert inserted["value"]["id"] == new_child_id
    status_update = next(e for e in root_added if e["type"] == "child_status")
    assert status_update["value"]["entity_url"] == forks[1]["url"]
    shared_fork_id = f"{shared_id}-fork-{suffix.group(1)}"
    assert ("manifest", f"shared-state:{shared_fork_id}", "insert") in by_op

    # Shared state was forked with its content; sources are untouched.
    shared_events = await read_events(http, server, f"/_electric/shared-state/{shared_fork_id}")
    assert shared_events == await read_events(http, server, shared_path)
    for url, history in source_history.items():
        assert await read_events(http, server, f"{url}/main") == history
    # The forks are real entities: readable, and they accept sends.
    got = await http.get(server.origin + f"/_electric/entities{forks[2]['url']}")
    assert got.status_code == 200 and got.json()["parent"] == forks[1]["url"]
    sent = await http.post(
        server.origin + f"/_electric/entities{forks[0]['url']}/send", json={"payload": "hi"}
    )
    assert sent.status_code in (200, 204), sent.text
    # Appending to a fork does not touch its source (copy-on-write).
    await append(http, server, db, forks[0]["url"], child_status(child))
    assert await read_events(http, server, f"{root['url']}/main") == source_history[root["url"]]


async def test_explicit_instance_id_names_the_root(
    http: httpx.AsyncClient, server: ServerProcess, kind: str
) -> None:
    root = await spawn_entity(http, server, kind)
    child = await spawn_entity(http, server, kind, parent=root["url"])
    wanted = unique_id("copy")
    answer = await fork(http, server, root["url"], instance_id=wanted)
    assert answer.status_code == 201, answer.text
    forks = answer.json()["entities"]
    assert forks[0]["url"] == f"/{kind}/{wanted}"
    assert re.fullmatch(rf"{re.escape(child['url'])}-fork-[0-9a-f]{{8}}", forks[1]["url"])

    again = await fork(http, server, root["url"], instance_id=wanted)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "DUPLICATE_URL"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instance_id": ""}, "Fork instance_id must not be empty or contain forward slashes"),
        ({"instance_id": "a/b"}, "Fork instance_id must not be empty or contain forward slashes"),
        ({"waitTimeoutMs": -1}, "waitTimeoutMs must be a non-negative number"),
        ({"waitTimeoutMs": "soon"}, "Request body does not match API schema"),
        ({"instance_id": 7}, "Request body does not match API schema"),
    ],
)
async def test_bad_arguments_are_400(
    http: httpx.AsyncClient, server: ServerProcess, kind: str, body: dict[str, Any], message: str
) -> None:
    root = await spawn_entity(http, server, kind)
    answer = await fork(http, server, root["url"], **body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == {**answer.json()["error"], "code": "INVALID_REQUEST"}
    assert answer.json()["error"]["message"] == message


async def test_refusals(http: httpx.AsyncClient, server: ServerProcess, db: Any, kind: str) -> None:
    root = await spawn_entity(http, server, kind)
    child = await spawn_entity(http, server, kind, parent=root["url"])

    not_top = await fork(http, server, child["url"])
    assert not_top.status_code == 400
    assert not_top.json()["error"]["message"] == "Only top-level entities can be forked"

    missing = await http.post(server.origin + f"/_electric/entities/{kind}/nobody/fork", json={})
    assert missing.status_code == 404

    principal = await http.post(
        server.origin + "/_electric/entities/principal/user:alice/fork", json={}
    )
    assert principal.status_code == 400
    assert "cannot be forked" in principal.json()["error"]["message"]

    await set_status(db, child["url"], "killed")
    terminal = await fork(http, server, root["url"])
    assert terminal.status_code == 409
    assert terminal.json()["error"] == {
        "code": "NOT_RUNNING",
        "message": f'Cannot fork terminal entity "{child["url"]}"',
    }
    assert (
        await db.fetchval(
            "SELECT count(*) FROM entities WHERE tenant_id = $1 AND url LIKE $2",
            TENANT,
            f"{root['url']}-fork-%",
        )
        == 0
    )


async def test_busy_subtree_times_out_then_forks_once_quiet(
    http: httpx.AsyncClient, server: ServerProcess, db: Any, kind: str
) -> None:
    root = await spawn_entity(http, server, kind)
    child = await spawn_entity(http, server, kind, parent=root["url"])
    await set_status(db, child["url"], "running")

    timed_out = await fork(http, server, root["url"], waitTimeoutMs=300)
    assert timed_out.status_code == 409
    assert timed_out.json()["error"] == {
        "code": "FORK_WAIT_TIMEOUT",
        "message": "Timed out waiting for subtree to become idle",
        "details": {"active": [child["url"]]},
    }

    async def finish_later() -> None:
        await asyncio.sleep(0.6)
        await set_status(db, child["url"], "paused")

    finishing = asyncio.create_task(finish_later())
    answer = await fork(http, server, root["url"], waitTimeoutMs=10_000)
    await finishing
    assert answer.status_code == 201, answer.text
    assert [e["status"] for e in answer.json()["entities"]] == ["idle", "idle"]


async def test_a_failure_half_way_leaves_nothing(
    http: httpx.AsyncClient, server: ServerProcess, db: Any, kind: str
) -> None:
    """The target error stream is taken (a plain stream) after the main stream was forked:
    the whole fork rolls back."""
    root = await spawn_entity(http, server, kind)
    await append(http, server, db, root["url"], child_status(root))
    wanted = unique_id("clash")
    squatter = await http.put(
        server.origin + f"/{kind}/{wanted}/error", headers={"content-type": "text/plain"}
    )
    assert squatter.status_code == 201
    before = await db.fetchval("SELECT count(*) FROM entities")

    answer = await fork(http, server, root["url"], instance_id=wanted)
    assert answer.status_code == 409, answer.text
    assert await db.fetchval("SELECT count(*) FROM entities") == before
    assert not await stream_exists(http, server, f"/{kind}/{wanted}/main")
    # The source still works.
    sent = await http.post(
        server.origin + f"/_electric/entities{root['url']}/send", json={"payload": "still here"}
    )
    assert sent.status_code in (200, 204), sent.text


async def test_concurrent_forks_of_one_subtree_both_succeed(
    http: httpx.AsyncClient, server: ServerProcess, kind: str
) -> None:
    root = await spawn_entity(http, server, kind)
    await spawn_entity(http, server, kind, parent=root["url"])
    answers = await asyncio.gather(*(fork(http, server, root["url"]) for _ in range(4)))
    assert [a.status_code for a in answers] == [201] * 4, [a.text for a in answers]
    roots = {a.json()["root"]["url"] for a in answers}
    assert len(roots) == 4

"""Appends to entity streams through the server (spec/02 §3.6 "POST *", spec/03 §3.4, §3.7,
§4.11): write tokens, lifecycle refusals, state-schema validation, the run-finished shortcut,
and that every other path stays a plain stream append. Against a real `serve` process.
"""

from __future__ import annotations

import asyncio
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
    seed_entity,
    spawn,
    status_of,
    unique_id,
)
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

TYPE = "policytest"
NOTE_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
}
INVALID_TOKEN = {"error": {"code": "UNAUTHORIZED", "message": "Invalid write token"}}


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("policy"))


@pytest.fixture
async def db(db: asyncpg.Connection, http: httpx.AsyncClient, server: ServerProcess) -> Any:
    """conftest's connection, with this module's type registered first."""
    await register_type(http, server, TYPE)
    return db


async def append(
    http: httpx.AsyncClient,
    server: ServerProcess,
    path: str,
    event: Any,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await http.post(
        server.origin + path, content=orjson.dumps(event), headers={**JSON, **(headers or {})}
    )


def claim(token: str) -> dict[str, str]:
    return {"electric-claim-token": token}


def note(text: Any, key: str = "n1") -> dict[str, Any]:
    return {"type": "note", "key": key, "value": {"text": text}, "headers": {"operation": "insert"}}


async def type_with(
    http: httpx.AsyncClient, server: ServerProcess, state_schemas: dict[str, Any]
) -> str:
    """A fresh entity type with these state schemas; returns its name."""
    name = unique_id("typed")
    await register_type(http, server, name, state_schemas=state_schemas)
    return name


async def note_type(http: httpx.AsyncClient, server: ServerProcess) -> str:
    return await type_with(http, server, {"note": NOTE_SCHEMA})


# --- write tokens -------------------------------------------------------------------------


async def test_entity_appends_without_a_token_are_401(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    for stream in ("/main", "/error"):
        response = await append(http, server, url + stream, {"type": "text", "key": "t"})
        assert response.status_code == 401
        assert response.json() == INVALID_TOKEN
    assert len(await read_events(http, server, url + "/main")) == 1


async def test_wrong_tokens_are_401_including_the_spawn_token_and_another_entitys(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    spawned = await spawn(http, server, TYPE)
    url, spawn_token = spawned.json()["url"], spawned.headers["x-write-token"]
    other = await seed_entity(db, http, server, TYPE)
    await mint_token(db, url)
    other_token = await mint_token(db, other)
    for token in ["nope", other_token, spawn_token]:
        for headers in (claim(token), {"Authorization": f"Bearer {token}"}):
            response = await append(http, server, url + "/main", {"type": "t"}, headers)
            assert response.status_code == 401, (token, headers)


async def test_the_live_token_authorises_main_and_error_by_header_or_bearer(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    token = await mint_token(db, url)
    ok = [
        await append(http, server, url + "/main", {"type": "a"}, claim(token)),
        await append(
            http, server, url + "/main", {"type": "b"}, {"authorization": f"bearer {token}"}
        ),
        await append(http, server, url + "/error", {"type": "c"}, claim(token)),
    ]
    assert [r.status_code for r in ok] == [204, 204, 204]
    assert [e["type"] for e in await read_events(http, server, url + "/main")][1:] == ["a", "b"]
    assert await read_events(http, server, url + "/error") == [{"type": "c"}]


async def test_a_newer_claim_replaces_the_older_token(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    old = await mint_token(db, url, "wake-1")
    new = await mint_token(db, url, "wake-2")
    assert (await append(http, server, url + "/main", {"type": "x"}, claim(old))).status_code == 401
    assert (await append(http, server, url + "/main", {"type": "x"}, claim(new))).status_code == 204


async def test_tokens_survive_a_server_restart(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    token = await mint_token(db, url)
    server.restart()
    response = await append(http, server, url + "/main", {"type": "x"}, claim(token))
    assert response.status_code == 204


# --- plain appends ------------------------------------------------------------------------


async def test_plain_streams_need_no_token(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    path = f"/plain-stream-auth-test-{unique_id()}"
    created = await http.put(
        server.origin + path, content=b"a", headers={"Content-Type": "text/plain"}
    )
    assert created.status_code == 201
    appended = await http.post(
        server.origin + path, content=b"b", headers={"Content-Type": "text/plain"}
    )
    assert appended.status_code == 204


async def test_a_main_stream_of_no_entity_is_a_plain_stream(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    for path in (f"/{TYPE}/{unique_id('ghost')}/main", f"/x/{unique_id()}/error", "/main"):
        created = await http.put(server.origin + path, headers=JSON)
        assert created.status_code == 201, path
        response = await append(http, server, path, {"type": "anything"})
        assert response.status_code == 204, path


# --- lifecycle ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["spawning", "idle", "running", "paused", "stopping"])
async def test_live_entities_accept_handler_writes(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, status: str
) -> None:
    url = await seed_entity(db, http, server, TYPE, status=status)
    token = await mint_token(db, url)
    response = await append(http, server, url + "/main", {"type": "text", "key": "t"}, claim(token))
    assert response.status_code == 204


async def test_a_stopped_entity_refuses_writes_with_409_not_running(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="stopped")
    # Without a token the token check answers first.
    assert (await append(http, server, url + "/main", {"type": "x"})).status_code == 401
    token = await mint_token(db, url)
    response = await append(http, server, url + "/main", {"type": "x"}, claim(token))
    assert response.status_code == 409
    assert response.json() == {"error": {"code": "NOT_RUNNING", "message": "Entity is stopped"}}


async def test_a_killed_entitys_closed_stream_refuses_even_a_valid_token(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    kill = await http.post(
        f"{server.origin}/_electric/entities{url}/signal", json={"signal": "SIGKILL"}
    )
    assert kill.status_code == 200
    token = await mint_token(db, url)  # a token the kill did not see
    response = await append(http, server, url + "/main", {"type": "x"}, claim(token))
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "STREAM_CLOSED"
    assert response.headers["Stream-Closed"] == "true"


# --- state schemas ------------------------------------------------------------------------


async def test_events_are_validated_against_the_entitys_state_schemas(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, await note_type(http, server))
    token = await mint_token(db, url)
    main = url + "/main"

    assert (await append(http, server, main, note("hi"), claim(token))).status_code == 204
    bad = await append(http, server, main, note(42), claim(token))
    assert bad.status_code == 422
    assert bad.json() == {
        "error": {"code": "SCHEMA_VALIDATION_FAILED", "message": "Validation failed"}
    }
    unknown = await append(http, server, main, {"type": "other", "value": {}}, claim(token))
    assert unknown.status_code == 422
    assert unknown.json() == {
        "error": {"code": "UNKNOWN_EVENT_TYPE", "message": 'Unknown event type "other"'}
    }
    # No type, or no value: nothing to check.
    assert (await append(http, server, main, {"key": "k"}, claim(token))).status_code == 204
    assert (await append(http, server, main, {"type": "note"}, claim(token))).status_code == 204
    types = [e.get("type") for e in await read_events(http, server, main)]
    assert types == ["entity_created", "note", None, "note"]


async def test_deletes_are_validated_against_old_value(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, await note_type(http, server))
    token = await mint_token(db, url)
    good = {
        "type": "note",
        "key": "n",
        "old_value": {"text": "x"},
        "headers": {"operation": "delete"},
    }
    bad = {**good, "old_value": {"text": 1}, "value": {"text": "ignored"}}
    assert (await append(http, server, url + "/main", good, claim(token))).status_code == 204
    assert (await append(http, server, url + "/main", bad, claim(token))).status_code == 422


async def test_an_array_is_checked_event_by_event_and_refused_whole(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, await note_type(http, server))
    token = await mint_token(db, url)
    batch = [note("a", "1"), {"type": "mystery"}, note(5, "3")]
    response = await append(http, server, url + "/main", batch, claim(token))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "UNKNOWN_EVENT_TYPE"  # the first failure wins
    assert len(await read_events(http, server, url + "/main")) == 1


async def test_an_empty_schema_map_refuses_every_typed_event(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, await type_with(http, server, {}))
    token = await mint_token(db, url)
    typed = await append(http, server, url + "/main", {"type": "text"}, claim(token))
    assert typed.status_code == 422
    untyped = await append(http, server, url + "/main", {"key": "k"}, claim(token))
    assert untyped.status_code == 204


async def test_without_schemas_anything_goes(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    token = await mint_token(db, url)
    response = await append(
        http, server, url + "/main", {"type": "whatever", "value": 1}, claim(token)
    )
    assert response.status_code == 204


async def test_the_types_current_schemas_are_merged_over_the_snapshot(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    type_name = await note_type(http, server)
    url = await seed_entity(db, http, server, type_name)
    # Re-registered after the spawn: the entity keeps its snapshot, the type moved on.
    moved_on = {"note": {"type": "object"}, "tick": {"type": "integer"}}
    await register_type(http, server, type_name, state_schemas=moved_on)
    token = await mint_token(db, url)
    main = url + "/main"
    # The type's `note` (any object) wins over the snapshot's (which needs `text`), and its
    # new key applies at once.
    assert (await append(http, server, main, note(1), claim(token))).status_code == 204
    tick = {"type": "tick", "key": "k", "value": 3}
    assert (await append(http, server, main, tick, claim(token))).status_code == 204
    wrong = await append(http, server, main, {**tick, "value": "3"}, claim(token))
    assert wrong.status_code == 422


# --- run finished -> idle (spec/03 §4.11) ---------------------------------------------------


def run_update(status: str, operation: str = "update") -> dict[str, Any]:
    return {
        "type": "run",
        "key": "run-1",
        "value": {"status": status},
        "headers": {"operation": operation},
    }


@pytest.mark.parametrize("run_status", ["completed", "failed"])
async def test_a_finished_run_makes_a_running_entity_idle(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, run_status: str
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    token = await mint_token(db, url)
    response = await append(
        http, server, url + "/main", [{"type": "text"}, run_update(run_status)], claim(token)
    )
    assert response.status_code == 204

    async def idle() -> bool:
        return await status_of(db, url) == "idle"

    await eventually(idle, "running -> idle")


@pytest.mark.parametrize(
    "event",
    [run_update("started"), run_update("completed", operation="insert"), {"type": "text"}],
    ids=["started", "insert", "not-a-run"],
)
async def test_other_events_leave_a_running_entity_running(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, event: dict[str, Any]
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    token = await mint_token(db, url)
    assert (await append(http, server, url + "/main", event, claim(token))).status_code == 204
    await asyncio.sleep(0.5)
    assert await status_of(db, url) == "running"


async def test_the_shortcut_is_off_once_the_entity_had_a_callback_wake(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    await db.execute(
        """
        INSERT INTO consumer_callbacks (tenant_id, consumer_id, callback_url, primary_stream)
        VALUES ($1, $2, 'http://ds/callback', $3)
        """,
        TENANT,
        unique_id("consumer"),
        url + "/main",
    )
    token = await mint_token(db, url)
    assert (
        await append(http, server, url + "/main", run_update("completed"), claim(token))
    ).status_code == 204
    await asyncio.sleep(0.5)
    assert await status_of(db, url) == "running"


async def test_a_refused_append_runs_no_hooks(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    assert (await append(http, server, url + "/main", run_update("completed"))).status_code == 401
    await asyncio.sleep(0.3)
    assert await status_of(db, url) == "running"

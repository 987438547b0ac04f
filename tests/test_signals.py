"""Signals and legacy kill (spec/02 §3.4, spec/03 §2.4-2.8) over HTTP against a real
`electric-agents serve` process and its PostgreSQL.

Every signal is sent from every status. Statuses no route reaches yet (running, paused,
stopping, spawning, and the terminal ones) are set directly in the database.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from agents_support import (
    JSON,
    TENANT,
    add_wake_registration,
    eventually,
    is_closed,
    mint_token,
    module_serve_server,
    read_events,
    register_type,
    seed_entity,
    status_of,
    unique_id,
    wake_registrations_touching,
)
from conftest import ServerProcess
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.signals import on_run_finished, on_wake_started
from electric_agents.agents.write_tokens import check_write_token
from electric_agents.config import Settings
from electric_agents.db.pool import open_pool
from electric_agents.streams.engine import StreamEngine

pytestmark = pytest.mark.timeout(120)

TYPE = "sigtest"
SIGNALS = ["SIGINT", "SIGHUP", "SIGTERM", "SIGKILL", "SIGSTOP", "SIGCONT", "SIGUSR"]

# spec/03 §2.4.1, read row by row: "<new status> <H|U|I>", H = handled (transitioned),
# I = handled (ignored), U = unhandled (left to the runtime).
MATRIX_TEXT = """
status    SIGINT       SIGHUP       SIGTERM      SIGKILL    SIGSTOP      SIGCONT      SIGUSR
spawning  spawning:U   spawning:U   spawning:U   killed:H   spawning:U   spawning:U   spawning:U
idle      idle:U       idle:U       stopped:H    killed:H   paused:H     idle:U       idle:U
running   running:U    running:U    stopping:U   killed:H   paused:U     running:U    running:U
paused    paused:I     paused:I     stopped:H    killed:H   paused:I     idle:U       paused:I
stopping  stopping:U   stopping:U   stopping:U   killed:H   stopping:U   stopping:U   stopping:U
"""


def _matrix() -> list[tuple[str, str, str, str]]:
    lines = [line.split() for line in MATRIX_TEXT.strip().splitlines()]
    header = lines[0][1:]
    cases = []
    for row in lines[1:]:
        for signal, cell in zip(header, row[1:], strict=True):
            new_status, kind = cell.split(":")
            cases.append((row[0], signal, new_status, kind))
    return cases


MATRIX = _matrix()


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("signals"))


@pytest.fixture
async def db(db: asyncpg.Connection, http: httpx.AsyncClient, server: ServerProcess) -> Any:
    """conftest's connection, with this module's type registered first."""
    await register_type(http, server, TYPE)
    return db


def without_offset(event: dict[str, Any]) -> dict[str, Any]:
    headers = {k: v for k, v in event["headers"].items() if k != "offset"}
    return {**event, "headers": headers}


def signal_url(server: ServerProcess, entity_url: str) -> str:
    return f"{server.origin}/_electric/entities{entity_url}/signal"


async def post_signal(
    http: httpx.AsyncClient, server: ServerProcess, entity_url: str, body: dict[str, Any]
) -> httpx.Response:
    return await http.post(signal_url(server, entity_url), json=body)


# --- the matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "signal", "new_status", "kind"),
    MATRIX,
    ids=[f"{status}-{signal}" for status, signal, _, _ in MATRIX],
)
async def test_every_signal_from_every_live_status_follows_the_spec_matrix(
    db: Any,
    http: httpx.AsyncClient,
    server: ServerProcess,
    status: str,
    signal: str,
    new_status: str,
    kind: str,
) -> None:
    url = await seed_entity(db, http, server, TYPE, status=status)
    token = await mint_token(db, url)
    other = f"/{TYPE}/{unique_id('other')}"
    await add_wake_registration(db, url, other)
    await add_wake_registration(db, other, url)
    before = await db.fetchval("SELECT updated_at FROM entities WHERE url = $1", url)

    response = await post_signal(http, server, url, {"signal": signal})

    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["url", "signal", "previous_state", "new_state", "created_at", "txid"]
    assert body["url"] == url and body["signal"] == signal
    assert body["previous_state"] == status and body["new_state"] == new_status
    assert isinstance(body["txid"], int) and isinstance(body["created_at"], int)
    assert await status_of(db, url) == new_status
    # Even an unchanged status is touched, so the txid names a real row change.
    assert await db.fetchval("SELECT updated_at FROM entities WHERE url = $1", url) >= before

    event = (await read_events(http, server, url + "/main"))[-1]
    assert event["type"] == "signal" and event["key"].startswith("sig-")
    assert event["headers"]["operation"] == "insert"
    assert event["headers"]["txid"] == str(body["txid"])
    value = event["value"]
    assert value["signal"] == signal and value["sender"] == "/_electric/server"
    if kind == "U":
        assert value["status"] == "unhandled"
        assert not {"handled_at", "handled_by", "outcome", "previous_state", "new_state"} & set(
            value
        )
    else:
        assert value["status"] == "handled"
        assert value["handled_by"] == "/_electric/server"
        assert value["handled_at"] == value["timestamp"]
        assert value["outcome"] == ("ignored" if kind == "I" else "transitioned")
        assert value["previous_state"] == status and value["new_state"] == new_status

    terminal = new_status in ("stopped", "killed")
    assert await is_closed(http, server, url + "/main") is terminal
    assert await is_closed(http, server, url + "/error") is terminal
    # The same event goes to the error stream (each stream stamps its own offset).
    error_events = await read_events(http, server, url + "/error")
    assert [without_offset(e) for e in error_events] == (
        [without_offset(event)] if terminal else []
    )
    remaining = await wake_registrations_touching(db, url)
    assert remaining == ([] if terminal else [(url, other), (other, url)])
    assert await check_write_token(db, TENANT, url, token) is not terminal


@pytest.mark.parametrize("status", ["stopped", "killed"])
@pytest.mark.parametrize("signal", SIGNALS)
async def test_signals_on_terminal_entities_are_409_invalid_signal_and_write_nothing(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, status: str, signal: str
) -> None:
    url = await seed_entity(db, http, server, TYPE, status=status)
    before = await read_events(http, server, url + "/main")

    response = await post_signal(http, server, url, {"signal": signal})

    assert response.status_code == 409
    assert response.json() == {
        "error": {"code": "INVALID_SIGNAL", "message": f"Cannot signal a {status} entity"}
    }
    assert await read_events(http, server, url + "/main") == before
    assert await status_of(db, url) == status


# --- request checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"signal": "SIGQUIT"},
        {"signal": "sigkill"},
        {},
        {"signal": 9},
        {"signal": "SIGINT", "reason": 5},
    ],
    ids=["unknown", "lowercase", "missing", "number", "reason-not-string"],
)
async def test_bad_signal_bodies_are_400_invalid_request(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, body: dict[str, Any]
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    response = await post_signal(http, server, url, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_REQUEST"
    assert await status_of(db, url) == "idle"


async def test_invalid_json_body_is_400(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    response = await http.post(signal_url(server, url), content=b"{nope", headers=JSON)
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "INVALID_REQUEST", "message": "Invalid JSON body"}


async def test_missing_entity_of_a_registered_type_is_404_not_found(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = f"/{TYPE}/{unique_id('nobody')}"
    response = await post_signal(http, server, url, {"signal": "SIGKILL"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "NOT_FOUND",
        "message": f"Entity not found at {url}",
    }


async def test_existence_is_checked_before_the_body(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    response = await post_signal(http, server, f"/{TYPE}/{unique_id()}", {"signal": "NOPE"})
    assert response.status_code == 404


async def test_unregistered_type_is_404_unknown_entity_type(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    response = await post_signal(http, server, "/no-such-type/x1", {"signal": "SIGKILL"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "UNKNOWN_ENTITY_TYPE",
        "message": 'Entity type "no-such-type" not found',
    }


async def test_principal_entities_cannot_be_signaled_or_killed(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    signalled = await post_signal(http, server, "/principal/user%3Abob", {"signal": "SIGKILL"})
    assert signalled.status_code == 400
    assert signalled.json()["error"] == {
        "code": "INVALID_REQUEST",
        "message": "Principal entities are built in and cannot be signaled",
    }
    killed = await http.delete(f"{server.origin}/_electric/entities/principal/user%3Abob")
    assert killed.status_code == 400
    assert killed.json()["error"]["message"] == (
        "Principal entities are built in and cannot be killed"
    )


# --- event contents -----------------------------------------------------------------------


async def test_reason_and_payload_are_recorded_in_the_event(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    payload = {"note": "hi", "n": [1, 2]}
    response = await post_signal(
        http, server, url, {"signal": "SIGUSR", "reason": "custom", "payload": payload}
    )
    assert response.status_code == 200
    value = (await read_events(http, server, url + "/main"))[-1]["value"]
    assert value["reason"] == "custom" and value["payload"] == payload
    assert list(value) == ["signal", "status", "sender", "timestamp", "reason", "payload"]


async def test_a_null_payload_is_kept_and_an_absent_one_is_not(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    assert (await post_signal(http, server, url, {"signal": "SIGINT", "payload": None})).is_success
    assert (await post_signal(http, server, url, {"signal": "SIGINT"})).is_success
    events = (await read_events(http, server, url + "/main"))[-2:]
    assert "payload" in events[0]["value"] and events[0]["value"]["payload"] is None
    assert "payload" not in events[1]["value"] and "reason" not in events[1]["value"]


async def test_earlier_events_stay_readable_before_the_terminal_signal(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    await post_signal(http, server, url, {"signal": "SIGUSR"})
    await post_signal(http, server, url, {"signal": "SIGKILL", "reason": "done"})
    events = await read_events(http, server, url + "/main")
    assert [e["type"] for e in events] == ["entity_created", "signal", "signal"]
    assert [e["value"]["signal"] for e in events[1:]] == ["SIGUSR", "SIGKILL"]
    # The kill revoked the write token, so a handler's append is refused outright.
    refused = await http.post(server.origin + url + "/main", content=b"{}", headers=JSON)
    assert refused.status_code == 401


# --- legacy kill --------------------------------------------------------------------------


async def test_legacy_delete_is_sigkill_with_the_legacy_reason(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    response = await http.delete(f"{server.origin}/_electric/entities{url}")
    assert response.status_code == 200
    assert list(response.json()) == ["txid"] and isinstance(response.json()["txid"], int)
    assert await status_of(db, url) == "killed"
    event = (await read_events(http, server, url + "/main"))[-1]
    assert event["value"]["signal"] == "SIGKILL"
    assert event["value"]["reason"] == "Legacy kill command"
    assert event["headers"]["txid"] == str(response.json()["txid"])
    assert await is_closed(http, server, url + "/main")
    assert await is_closed(http, server, url + "/error")

    again = await http.delete(f"{server.origin}/_electric/entities{url}")
    assert again.status_code == 409
    assert again.json()["error"] == {
        "code": "INVALID_SIGNAL",
        "message": "Cannot signal a killed entity",
    }


async def test_legacy_delete_of_a_missing_entity_is_404(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    response = await http.delete(f"{server.origin}/_electric/entities/{TYPE}/{unique_id()}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NOT_FOUND"


# --- concurrency and atomicity ------------------------------------------------------------


async def test_concurrent_kills_kill_once_and_write_one_event(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    responses = await asyncio.gather(
        *(post_signal(http, server, url, {"signal": "SIGKILL"}) for _ in range(8))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] + [409] * 7
    events = await read_events(http, server, url + "/main")
    assert [e["type"] for e in events] == ["entity_created", "signal"]
    assert len(await read_events(http, server, url + "/error")) == 1


async def test_concurrent_signals_each_see_the_status_the_previous_one_left(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE)
    responses = await asyncio.gather(
        *(post_signal(http, server, url, {"signal": s}) for s in ["SIGSTOP", "SIGCONT"] * 5)
    )
    assert all(r.status_code == 200 for r in responses)
    # Under the row lock the signals form one chain: in stream order, each one's
    # previous_state is the new_state of the one before it.
    by_txid = {str(r.json()["txid"]): r.json() for r in responses}
    events = (await read_events(http, server, url + "/main"))[1:]
    chain = [by_txid[e["headers"]["txid"]] for e in events]
    assert len(chain) == len(responses) == len(by_txid)
    assert chain[0]["previous_state"] == "idle"
    for earlier, later in itertools.pairwise(chain):
        assert later["previous_state"] == earlier["new_state"]


# --- the fixed lifecycle quirks (spec/03 §2.7, §2.8) ---------------------------------------


def run_finished_event(status: str = "completed") -> dict[str, Any]:
    return {
        "type": "run",
        "key": "run-1",
        "value": {"status": status},
        "headers": {"operation": "update"},
    }


async def append_as_handler(
    http: httpx.AsyncClient, server: ServerProcess, url: str, token: str, event: Any
) -> httpx.Response:
    return await http.post(
        server.origin + url + "/main",
        json=event,
        headers={"electric-claim-token": token},
    )


async def test_sigstop_on_a_running_entity_survives_the_end_of_its_run(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    token = await mint_token(db, url)
    stop = await post_signal(http, server, url, {"signal": "SIGSTOP"})
    assert stop.json()["new_state"] == "paused"

    finished = await append_as_handler(http, server, url, token, run_finished_event())
    assert finished.status_code == 204
    # The run-finished hook runs after the response; give it time to (wrongly) write idle.
    marker = await append_as_handler(http, server, url, token, {"type": "text", "key": "t"})
    assert marker.status_code == 204
    await asyncio.sleep(0.5)
    assert await status_of(db, url) == "paused"

    resumed = await post_signal(http, server, url, {"signal": "SIGCONT"})
    assert resumed.json()["previous_state"] == "paused"
    assert resumed.json()["new_state"] == "idle"


async def test_sigterm_on_a_running_entity_stops_it_fully_when_its_run_finishes(
    db: Any, http: httpx.AsyncClient, server: ServerProcess
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    token = await mint_token(db, url)
    other = f"/{TYPE}/{unique_id('parent')}"
    await add_wake_registration(db, other, url)
    await add_wake_registration(db, url, other)

    term = await post_signal(http, server, url, {"signal": "SIGTERM"})
    assert term.json()["new_state"] == "stopping"
    assert (await read_events(http, server, url + "/main"))[-1]["value"]["status"] == "unhandled"
    # While stopping, the handler still writes (it is finishing its run).
    still = await append_as_handler(http, server, url, token, {"type": "text", "key": "t1"})
    assert still.status_code == 204

    finished = await append_as_handler(http, server, url, token, run_finished_event("failed"))
    assert finished.status_code == 204

    async def stopped() -> bool:
        return await status_of(db, url) == "stopped"

    await eventually(stopped, "stopping -> stopped")
    # The full terminal cleanup ran (the reference only wrote the status).
    assert await is_closed(http, server, url + "/main")
    assert await is_closed(http, server, url + "/error")
    assert await wake_registrations_touching(db, url) == []
    assert not await check_write_token(db, TENANT, url, token)
    assert (await read_events(http, server, url + "/main"))[-1]["type"] == "run"
    late = await post_signal(http, server, url, {"signal": "SIGKILL"})
    assert late.status_code == 409


# --- wake start and end, as the dispatch layer will call them ------------------------------
# No route reaches these yet (webhook forwarding and claims come with dispatch), so they are
# called in-process on the server's own database.


@pytest.fixture
async def runtime(server: ServerProcess) -> AsyncIterator[AgentsRuntime]:
    assert server.database_url is not None
    pool = await open_pool(server.database_url, min_size=1, max_size=4)
    engine = StreamEngine(pool, server.database_url)
    await engine.start()
    agents = AgentsRuntime(Settings(), pool, engine)
    try:
        yield agents
    finally:
        await agents.stop()
        await engine.stop()
        await pool.close()


WAKE_START = [
    ("spawning", "running"),
    ("idle", "running"),
    ("running", "running"),
    ("stopping", "stopping"),  # the stop SIGTERM asked for is kept (spec/03 §2.8.2)
    ("paused", None),
    ("stopped", None),
    ("killed", None),  # the reference still forwarded to killed entities (§2.8.3)
]


@pytest.mark.parametrize(("status", "expected"), WAKE_START)
async def test_a_starting_wake_marks_the_entity_running_or_is_refused(
    db: Any,
    http: httpx.AsyncClient,
    server: ServerProcess,
    runtime: AgentsRuntime,
    status: str,
    expected: str | None,
) -> None:
    url = await seed_entity(db, http, server, TYPE, status=status)
    change = await on_wake_started(runtime, url)
    if expected is None:
        assert change is None
        assert await status_of(db, url) == status
    else:
        assert change is not None and change.new_state == expected
        assert change.changed is (expected != status)
        assert await status_of(db, url) == expected


RUN_FINISHED = [
    ("spawning", "idle"),
    ("idle", "idle"),
    ("running", "idle"),
    ("paused", "paused"),  # SIGSTOP during the wake survives it (spec/03 §2.8.1)
    ("stopping", "stopped"),  # with the full terminal cleanup (spec/03 §2.7)
    ("stopped", "stopped"),
    ("killed", "killed"),
]


@pytest.mark.parametrize(("status", "expected"), RUN_FINISHED)
async def test_a_finished_wake_moves_the_entity_on(
    db: Any,
    http: httpx.AsyncClient,
    server: ServerProcess,
    runtime: AgentsRuntime,
    status: str,
    expected: str,
) -> None:
    url = await seed_entity(db, http, server, TYPE, status=status)
    token = await mint_token(db, url, "wake-a")
    await add_wake_registration(db, url, f"/{TYPE}/{unique_id('src')}")

    change = await on_run_finished(runtime, url)

    assert change.new_state == expected and await status_of(db, url) == expected
    stopped_now = status == "stopping"
    assert await is_closed(http, server, url + "/main") is stopped_now
    assert await is_closed(http, server, url + "/error") is stopped_now
    assert (await wake_registrations_touching(db, url) == []) is stopped_now
    # Without a wake id only a terminal entry revokes the token.
    assert await check_write_token(db, TENANT, url, token) is not stopped_now


async def test_a_finished_wake_revokes_only_its_own_token(
    db: Any, http: httpx.AsyncClient, server: ServerProcess, runtime: AgentsRuntime
) -> None:
    url = await seed_entity(db, http, server, TYPE, status="running")
    old = await mint_token(db, url, "wake-old")
    new = await mint_token(db, url, "wake-new")
    assert not await check_write_token(db, TENANT, url, old)

    await on_run_finished(runtime, url, wake_id="wake-old")
    assert await check_write_token(db, TENANT, url, new)  # a newer claim owns it
    await on_run_finished(runtime, url, wake_id="wake-new")
    assert not await check_write_token(db, TENANT, url, new)
    assert await status_of(db, url) == "idle"

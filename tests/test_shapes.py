"""The Electric shape API at `/_electric/electric/v1/shape` (spec/02 §3.2, spec/04 §4), read
with the real `@electric-sql/client` from npm (tests/shape_client, pinned with a lockfile;
`npm ci` runs once when its node_modules is missing) and with plain HTTP for the protocol
edges: snapshots, live changes with txids, resume, must-refetch, two processes, tenant and
owner scoping, pinned columns and the where subset."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import ServerFactory, ServerProcess
from electric_agents.shapes.log import prune

CLIENT_DIR = Path(__file__).resolve().parent / "shape_client"
CLIENT_SCRIPT = CLIENT_DIR / "shape.mjs"
CLIENT_PACKAGE = CLIENT_DIR / "node_modules" / "@electric-sql" / "client"
SHAPE_PATH = "/_electric/electric/v1/shape"
WAIT_S = 8.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="session")
def shape_client() -> Path:
    """The node project with @electric-sql/client installed (`npm ci` if missing)."""
    if CLIENT_PACKAGE.is_dir():
        return CLIENT_DIR
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not on PATH; the shape client tests need Node and npm")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=CLIENT_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return CLIENT_DIR


class ShapeReader:
    """One `ShapeStream` in a node process; every batch it publishes is one JSON line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.changes: list[dict[str, Any]] = []
        self.handle: str | None = None
        self.offset: str | None = None
        self.controls: list[str] = []

    async def next_batch(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            assert self.proc.stderr is not None
            stderr = await self.proc.stderr.read()
            raise AssertionError(f"shape client exited: {stderr.decode()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == "error":
            raise AssertionError(f"shape client error: {event}")
        self.handle, self.offset = event["handle"], event["offset"]
        for message in event["messages"]:
            if "control" in message["headers"]:
                self.controls.append(message["headers"]["control"])
            else:
                self.changes.append(message)
        return event

    async def until(
        self, check: Callable[[list[dict[str, Any]]], bool], timeout_s: float = WAIT_S
    ) -> list[dict[str, Any]]:
        """Read batches until `check(all changes so far)` holds."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not check(self.changes):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"timed out; changes so far: {self.changes}")
            await self.next_batch(remaining)
        return self.changes

    async def assert_quiet(self, seconds: float) -> None:
        """No change arrives for `seconds` (live polls that end up-to-date are fine)."""
        before = len(self.changes)
        deadline = asyncio.get_running_loop().time() + seconds
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                await self.next_batch(remaining)
            except TimeoutError:
                break
        assert self.changes[before:] == []

    async def up_to_date(self) -> None:
        while "up-to-date" not in self.controls:
            await self.next_batch()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


@pytest.fixture
async def open_reader(shape_client: Path) -> AsyncIterator[Callable[..., Any]]:
    readers: list[ShapeReader] = []

    async def start(
        server: ServerProcess, table: str, *, subscribe: bool = True, **options: Any
    ) -> ShapeReader:
        config = {
            "url": server.origin + SHAPE_PATH,
            "params": {"table": table, **options.pop("params", {})},
            "subscribe": subscribe,
            **options,
        }
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(CLIENT_SCRIPT),
            json.dumps(config),
            cwd=shape_client,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # one line is one batch, up to a full response
        )
        reader = ShapeReader(proc)
        readers.append(reader)
        return reader

    yield start
    for reader in readers:
        await reader.close()


@pytest.fixture
def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("serve")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        yield client


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def register_type(http: httpx.AsyncClient, server: ServerProcess, name: str) -> None:
    body = {
        "name": name,
        "description": "shape test type",
        "state_schemas": {"notes": {"type": "object"}},
    }
    response = await http.post(f"{server.origin}/_electric/entity-types", json=body)
    assert response.status_code == 201, response.text


async def spawn(
    http: httpx.AsyncClient, server: ServerProcess, type_name: str, **body: Any
) -> dict[str, Any]:
    url = f"{server.origin}/_electric/entities/{type_name}/{uid('e')}"
    response = await http.put(url, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def signal(http: httpx.AsyncClient, server: ServerProcess, entity_url: str, name: str) -> int:
    response = await http.post(
        f"{server.origin}/_electric/entities{entity_url}/signal", json={"signal": name}
    )
    assert response.status_code == 200, response.text
    txid: int = response.json()["txid"]
    return txid


def with_url(url: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda changes: [c for c in changes if c["value"].get("url") == url]


async def shape_get(
    http: httpx.AsyncClient, server: ServerProcess, **params: str
) -> httpx.Response:
    return await http.get(server.origin + SHAPE_PATH, params=params)


# --- snapshot ----------------------------------------------------------------------------


async def test_snapshot_lists_entities_with_pinned_columns_and_typed_values(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    entity = await spawn(http, server, type_name, tags={"title": "hello"})

    reader = await open_reader(server, "entities", subscribe=False)
    await reader.up_to_date()
    (row,) = [c for c in reader.changes if c["value"]["url"] == entity["url"]]
    assert row["headers"]["operation"] == "insert"
    value = row["value"]
    assert set(value) == {
        "tenant_id", "url", "type", "status", "dispatch_policy", "tags", "spawn_args",
        "parent", "type_revision", "inbox_schemas", "state_schemas", "created_at", "updated_at",
    }  # fmt: skip
    assert "write_token" not in value and "subscription_id" not in value
    # jsonb arrives as objects, int8 as BigInt (the client's default parser).
    assert value["tags"] == {"title": "hello"}
    assert value["state_schemas"] == {"notes": {"type": "object"}}
    assert value["created_at"] == {"$bigint": str(entity["created_at"])}
    assert value["type_revision"] == 1 and value["status"] == "idle"

    # The web UI parses int8 as a number.
    as_number = await open_reader(server, "entities", subscribe=False, int8AsNumber=True)
    await as_number.up_to_date()
    (row,) = [c for c in as_number.changes if c["value"]["url"] == entity["url"]]
    assert row["value"]["created_at"] == entity["created_at"]


async def test_snapshot_of_entity_types_and_the_protocol_headers(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    reader = await open_reader(server, "entity_types", subscribe=False)
    await reader.up_to_date()
    (row,) = [c for c in reader.changes if c["value"]["name"] == type_name]
    assert row["value"]["state_schemas"] == {"notes": {"type": "object"}}
    assert row["value"]["revision"] == 1

    # `columns` is pinned per table, as the reference's proxy forces it.
    response = await shape_get(http, server, table="entity_types", offset="-1", columns="name")
    assert response.status_code == 200
    schema = json.loads(response.headers["electric-schema"])
    assert len(schema) == 11 and len(response.json()[0]["value"]) == 11
    assert schema["name"] == {"type": "text", "not_null": True, "pk_index": 1}
    assert schema["tenant_id"]["pk_index"] == 0
    assert schema["creation_schema"] == {"type": "jsonb"}
    assert schema["revision"]["type"] == "int4"
    assert "electric-up-to-date" in response.headers
    assert "electric-cursor" not in response.headers
    assert response.headers["electric-handle"] and response.headers["electric-offset"]
    body = response.json()
    assert body[-1]["headers"]["control"] == "up-to-date"


# --- live --------------------------------------------------------------------------------


async def test_live_spawn_signal_and_kill_arrive_with_the_txids_the_api_returned(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    reader = await open_reader(server, "entities")
    await reader.up_to_date()

    entity = await spawn(http, server, type_name)
    mine = with_url(entity["url"])
    insert = mine(await reader.until(lambda changes: len(mine(changes)) >= 1))[0]
    assert insert["headers"]["operation"] == "insert"
    # awaitTxId: the spawn's txid is in the change's txids.
    assert entity["txid"] in insert["headers"]["txids"]

    txid = await signal(http, server, entity["url"], "SIGSTOP")
    changes = await reader.until(lambda changes: len(mine(changes)) >= 2)
    update = mine(changes)[1]
    assert update["headers"]["operation"] == "update"
    assert update["headers"]["txids"] == [txid]
    assert update["value"]["status"] == "paused"

    kill_txid = await signal(http, server, entity["url"], "SIGKILL")
    changes = await reader.until(lambda changes: len(mine(changes)) >= 3)
    assert mine(changes)[2]["value"]["status"] == "killed"
    assert mine(changes)[2]["headers"]["txids"] == [kill_txid]


async def test_live_entity_type_register_amend_and_delete(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    reader = await open_reader(server, "entity_types")
    await reader.up_to_date()
    type_name = uid("t")
    mine = lambda changes: [c for c in changes if c["value"].get("name") == type_name]  # noqa: E731

    await register_type(http, server, type_name)
    await reader.until(lambda changes: len(mine(changes)) >= 1)
    amended = await http.patch(
        f"{server.origin}/_electric/entity-types/{type_name}/schemas",
        json={"state_schemas": {"more": {"type": "object"}}},
    )
    assert amended.status_code == 200, amended.text
    await reader.until(lambda changes: len(mine(changes)) >= 2)
    deleted = await http.delete(f"{server.origin}/_electric/entity-types/{type_name}")
    assert deleted.status_code in (200, 204), deleted.text
    changes = mine(await reader.until(lambda changes: len(mine(changes)) >= 3))

    assert [c["headers"]["operation"] for c in changes] == ["insert", "update", "delete"]
    assert changes[1]["value"]["revision"] == 2
    assert set(changes[1]["value"]["state_schemas"]) == {"notes", "more"}
    # A delete carries the primary key (replica=default).
    assert changes[2]["value"] == {"tenant_id": "default", "name": type_name}
    assert changes[2]["key"] == changes[0]["key"]


async def test_resume_from_an_offset_returns_only_later_changes(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    before = await spawn(http, server, type_name)
    first = await open_reader(server, "entities", subscribe=False)
    await first.up_to_date()
    assert any(c["value"]["url"] == before["url"] for c in first.changes)

    after = await spawn(http, server, type_name)
    resumed = await open_reader(
        server, "entities", subscribe=False, offset=first.offset, handle=first.handle
    )
    await resumed.up_to_date()
    assert [c["value"]["url"] for c in resumed.changes] == [after["url"]]
    assert after["txid"] in resumed.changes[0]["headers"]["txids"]


async def test_a_change_through_one_process_is_live_on_a_shape_read_through_the_other(
    server_factory: ServerFactory, http: httpx.AsyncClient, open_reader: Any
) -> None:
    a = server_factory("serve", long_poll_timeout_ms=20_000)
    b = server_factory("serve", long_poll_timeout_ms=20_000)
    type_name = uid("t")
    await register_type(http, a, type_name)
    reader = await open_reader(b, "entities")
    await reader.up_to_date()

    started = asyncio.get_running_loop().time()
    entity = await spawn(http, a, type_name)
    mine = with_url(entity["url"])
    insert = mine(await reader.until(lambda changes: len(mine(changes)) >= 1))[0]
    # Woken through the database, long before the 20 s long-poll would have ended.
    assert asyncio.get_running_loop().time() - started < 3.0
    assert entity["txid"] in insert["headers"]["txids"]


async def test_concurrent_spawns_through_two_processes_all_arrive_exactly_once(
    server_factory: ServerFactory, http: httpx.AsyncClient, open_reader: Any
) -> None:
    a = server_factory("serve")
    b = server_factory("serve")
    type_name = uid("t")
    await register_type(http, a, type_name)
    reader = await open_reader(a, "entities", params={"where": f"type = '{type_name}'"})
    await reader.up_to_date()

    spawned = await asyncio.gather(*(spawn(http, a if i % 2 else b, type_name) for i in range(30)))
    urls = {entity["url"] for entity in spawned}
    changes = await reader.until(lambda changes: len(changes) >= 30)
    await reader.assert_quiet(1.0)  # a duplicate would have arrived by now
    assert sorted(c["value"]["url"] for c in changes) == sorted(urls)
    txids = {e["url"]: e["txid"] for e in spawned}
    assert all(txids[c["value"]["url"]] in c["headers"]["txids"] for c in changes)


# --- where, tenant and owner scoping -------------------------------------------------------


async def test_where_with_params_and_rows_moving_out_of_the_shape(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    reader = await open_reader(
        server,
        "entities",
        params={"where": "type = $1 AND status <> 'killed'", "params": {"1": type_name}},
    )
    await reader.up_to_date()
    entity = await spawn(http, server, type_name)
    await reader.until(lambda changes: len(changes) >= 1)
    await signal(http, server, entity["url"], "SIGKILL")
    changes = await reader.until(lambda changes: len(changes) >= 2)
    # Killed moves the row out of the shape: the client sees a delete.
    assert [c["headers"]["operation"] for c in changes] == ["insert", "delete"]


@pytest.mark.parametrize(
    "where",
    [
        "write_token LIKE 'a%'",  # hidden column
        "url = 'x'; DROP TABLE entities",
        "(SELECT 1) = 1",
        "pg_sleep(1) IS NULL",
        "url = $1",  # no params[1]
        "status = ",
        "url::regclass IS NULL",
        "created_at > 'abc'",  # parses, fails in Postgres
        "url @> 1",
        "status = 1",
        "url = '\x00'",
        "url = 'x' x",
    ],
)
async def test_where_outside_the_supported_subset_is_400(
    server: ServerProcess, http: httpx.AsyncClient, where: str
) -> None:
    response = await shape_get(http, server, table="entities", offset="-1", where=where)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_runners_are_filtered_by_the_callers_principal(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    for who in ("user:alice", "user:bob"):
        response = await http.post(
            f"{server.origin}/_electric/runners",
            json={"id": uid(who.split(":")[1]), "label": who},
            headers={"electric-principal": who},
        )
        assert response.status_code == 201, response.text
    response = await http.get(
        server.origin + SHAPE_PATH,
        params={"table": "runners", "offset": "-1"},
        headers={"electric-principal": "user:alice"},
    )
    assert response.status_code == 200
    rows = [m["value"] for m in response.json() if "value" in m]
    assert [row["label"] for row in rows] == ["user:alice"]
    assert rows[0]["owner_principal"] == "/principal/user%3Aalice"


# --- bad parameters and must-refetch --------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"offset": "-1"},
        {"table": "write_tokens", "offset": "-1"},
        {"table": "entities"},
        {"table": "entities", "offset": "banana"},
        {"table": "entities", "offset": "1_0"},  # no handle
        {"table": "entities", "offset": "-1", "live": "maybe"},
        {"table": "entities", "offset": "-1", "replica": "half"},
    ],
)
async def test_bad_parameters_are_400(
    server: ServerProcess, http: httpx.AsyncClient, params: dict[str, str]
) -> None:
    response = await shape_get(http, server, **params)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_a_bad_handle_is_409_must_refetch_with_a_new_handle(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    snapshot = await shape_get(http, server, table="entities", offset="-1")
    offset = snapshot.headers["electric-offset"]
    response = await shape_get(http, server, table="entities", offset=offset, handle="bogus")
    assert response.status_code == 409
    assert response.json() == [{"headers": {"control": "must-refetch"}}]
    assert response.headers["electric-handle"] not in ("", "bogus")
    # A handle of another shape (another where) does not fit either.
    other = await shape_get(
        http, server, table="entities", offset=offset, handle=snapshot.headers["electric-handle"],
        where="status = 'idle'",
    )  # fmt: skip
    assert other.status_code == 409

    # The real client recovers: must-refetch, then a fresh snapshot.
    type_name = uid("t")
    await register_type(http, server, type_name)
    reader = await open_reader(
        server, "entity_types", subscribe=False, offset=offset, handle="bogus"
    )
    await reader.up_to_date()
    assert "must-refetch" in reader.controls
    assert any(c["value"]["name"] == type_name for c in reader.changes)


async def test_an_offset_behind_retention_is_409_must_refetch(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    snapshot = await shape_get(http, server, table="entity_types", offset="-1")
    handle, offset = snapshot.headers["electric-handle"], snapshot.headers["electric-offset"]
    await register_type(http, server, uid("t"))
    await register_type(http, server, uid("t"))
    conn = await asyncpg.connect(server.database_url)
    try:
        # Wait for the sequencer, then keep no history at all.
        for _ in range(100):
            if not await conn.fetchval("SELECT count(*) FROM shape_changes WHERE position IS NULL"):
                break
            await asyncio.sleep(0.05)
        await prune(conn, 0)
    finally:
        await conn.close()
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        response = await shape_get(http, server, table="entity_types", offset=offset, handle=handle)
        if response.status_code == 409 or asyncio.get_running_loop().time() > deadline:
            break
        # Until the server's head passes the offset it has nothing to say; never the
        # pruned changes.
        assert response.status_code == 200 and len(response.json()) == 1, response.text
        await asyncio.sleep(0.05)
    assert response.status_code == 409
    assert response.headers["electric-handle"] != handle


async def test_live_request_without_changes_ends_up_to_date_with_a_cursor(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    snapshot = await shape_get(http, server, table="runners", offset="-1")
    handle, offset = snapshot.headers["electric-handle"], snapshot.headers["electric-offset"]
    response = await shape_get(
        http, server, table="runners", offset=offset, handle=handle, live="true", cursor="1"
    )
    assert response.status_code == 200
    # Other tables' changes (none of this shape) may have moved the offset on.
    position = response.headers["electric-offset"].split("_")[0]
    assert int(position) >= int(offset.split("_")[0])
    assert response.json() == [
        {"headers": {"control": "up-to-date", "global_last_seen_lsn": position}}
    ]
    assert response.headers["electric-cursor"] not in ("", "1")
    assert "electric-up-to-date" in response.headers
    assert response.headers["electric-handle"] == handle


# --- change capture under concurrency ---------------------------------------------------------


async def insert_entity_rows(
    conn: asyncpg.Connection, type_name: str, count: int, tenant: str = "default"
) -> None:
    """Entity rows written straight to the table (the shape reads rows, not the API)."""
    await conn.execute(
        """
        INSERT INTO entities (tenant_id, url, type, subscription_id, write_token,
                              created_at, updated_at)
        SELECT $1, '/' || $2 || '/r' || i, $2, 'sub', 'secret', 1, 1
        FROM generate_series(1, $3) AS i
        """,
        tenant,
        type_name,
        count,
    )


async def test_a_change_committed_after_a_later_one_is_not_skipped(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    """The commit-order trap: a transaction that took its log id first but commits last
    must still reach a reader that already read past the later one. A rolled-back change
    never appears."""
    type_name = uid("t")
    await register_type(http, server, type_name)
    first = await spawn(http, server, type_name)
    second = await spawn(http, server, type_name)
    reader = await open_reader(server, "entities", params={"where": f"type = '{type_name}'"})
    await reader.up_to_date()
    reader.changes.clear()

    slow = await asyncpg.connect(server.database_url)
    fast = await asyncpg.connect(server.database_url)
    try:
        slow_tx = slow.transaction()
        await slow_tx.start()
        await slow.execute(
            'UPDATE entities SET tags = \'{"k":"slow"}\' WHERE url = $1', first["url"]
        )
        async with fast.transaction():
            await fast.execute(
                'UPDATE entities SET tags = \'{"k":"fast"}\' WHERE url = $1', second["url"]
            )
        await reader.until(lambda changes: len(changes) >= 1)
        rolled_back = fast.transaction()
        await rolled_back.start()
        await fast.execute(
            'UPDATE entities SET tags = \'{"k":"never"}\' WHERE url = $1', second["url"]
        )
        await rolled_back.rollback()
        await slow_tx.commit()
        changes = await reader.until(lambda changes: len(changes) >= 2)
    finally:
        await slow.close()
        await fast.close()
    assert [c["value"]["tags"] for c in changes] == [{"k": "fast"}, {"k": "slow"}]
    await reader.assert_quiet(1.5)  # nothing of the rolled-back update


async def test_a_burst_larger_than_one_response_arrives_whole_and_in_order(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    reader = await open_reader(server, "entities", params={"where": f"type = '{type_name}'"})
    await reader.up_to_date()
    conn = await asyncpg.connect(server.database_url)
    try:
        await insert_entity_rows(conn, type_name, 1500)
        await conn.execute("UPDATE entities SET status = 'paused' WHERE type = $1", type_name)
    finally:
        await conn.close()
    changes = await reader.until(lambda changes: len(changes) >= 3000, timeout_s=20)
    assert len(changes) == 3000
    assert {c["headers"]["operation"] for c in changes[:1500]} == {"insert"}
    assert {c["value"]["status"] for c in changes[1500:]} == {"paused"}
    # One transaction each: every message of a statement carries its txid.
    assert len({c["headers"]["txids"][0] for c in changes[:1500]}) == 1


async def test_other_tenants_rows_are_not_in_the_shape(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    conn = await asyncpg.connect(server.database_url)
    try:
        await insert_entity_rows(conn, type_name, 2, tenant="other")
        reader = await open_reader(server, "entities", params={"where": f"type = '{type_name}'"})
        await reader.up_to_date()
        await insert_entity_rows(conn, type_name + "x", 1, tenant="other")
        await conn.execute("UPDATE entities SET type = $1 WHERE tenant_id = 'other'", type_name)
        await insert_entity_rows(conn, type_name, 1)
    finally:
        await conn.close()
    changes = await reader.until(lambda changes: len(changes) >= 1)
    await reader.assert_quiet(1.0)
    assert [(c["value"]["tenant_id"], c["value"]["url"]) for c in changes] == [
        ("default", f"/{type_name}/r1")
    ]


async def test_where_on_a_jsonb_field_and_an_update_of_hidden_columns_only(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    reader = await open_reader(
        server, "entities", params={"where": "tags->>'title' = $1", "params": {"1": "mine"}}
    )
    await reader.up_to_date()
    mine = await spawn(http, server, type_name, tags={"title": "mine"})
    await spawn(http, server, type_name, tags={"title": "theirs"})
    conn = await asyncpg.connect(server.database_url)
    try:
        # write_token is not in the shape: changing only it sends nothing.
        await conn.execute(
            "UPDATE entities SET write_token = 'rotated' WHERE url = $1", mine["url"]
        )
    finally:
        await conn.close()
    changes = await reader.until(lambda changes: len(changes) >= 1)
    await reader.assert_quiet(1.0)
    assert [c["value"]["url"] for c in changes] == [mine["url"]]


async def test_a_shape_resumes_across_a_kill_9_and_restart(
    server: ServerProcess, http: httpx.AsyncClient, open_reader: Any
) -> None:
    type_name = uid("t")
    await register_type(http, server, type_name)
    only_type = {"where": f"type = '{type_name}'"}
    first = await open_reader(server, "entities", params=only_type, subscribe=False)
    await first.up_to_date()

    server.kill9()
    # Written while no server runs: nothing sequences it until one starts.
    conn = await asyncpg.connect(server.database_url)
    try:
        await insert_entity_rows(conn, type_name, 1)
    finally:
        await conn.close()
    server.restart()
    spawned = await spawn(http, server, type_name)

    resumed = await open_reader(
        server, "entities", params=only_type, offset=first.offset, handle=first.handle
    )
    changes = await resumed.until(lambda changes: len(changes) >= 2)
    assert "must-refetch" not in resumed.controls  # the handle outlived the process
    assert [c["value"]["url"] for c in changes] == [f"/{type_name}/r1", spawned["url"]]

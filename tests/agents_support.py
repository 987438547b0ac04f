"""Helpers for agents-layer tests: one `electric-agents serve` process per test module on a
database of its own. Types and entities are made through the API; statuses, write tokens and
wake registrations that no route reaches yet (claims and wakes land in later issues) are
written directly to the database, through the server's own store functions where they exist.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import ServerProcess, database_url_for
from electric_agents.agents.entity_store import get_entity
from electric_agents.agents.write_tokens import mint_write_token

TENANT = "default"
JSON = {"Content-Type": "application/json"}
POLL_TIMEOUT_S = 20.0  # generous: a loaded machine must not fail a correct test


def module_serve_server(pg_server: Any, log_dir: Path) -> Iterator[ServerProcess]:
    """Body of a module-scoped fixture: `serve` on a fresh database, stopped at the end."""
    name = f"t_agents_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    server = ServerProcess(
        "serve",
        log_path=log_dir / "server.log",
        database_url=database_url_for(pg_server.get_uri(), name),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def attach_log(request: pytest.FixtureRequest, server: ServerProcess) -> None:
    """Have conftest attach the module server's log to this test's report if it fails."""
    from conftest import _SERVERS_KEY

    request.node.stash.setdefault(_SERVERS_KEY, []).append(server)


def unique_id(prefix: str = "e") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- seeding --------------------------------------------------------------------------------


async def register_type(
    http: httpx.AsyncClient,
    server: ServerProcess,
    name: str,
    *,
    state_schemas: dict[str, Any] | None = None,
) -> None:
    """Register (or re-register) an entity type through the API."""
    body: dict[str, Any] = {"name": name, "description": "test type"}
    if state_schemas is not None:
        body["state_schemas"] = state_schemas
    response = await http.post(f"{server.origin}/_electric/entity-types", json=body)
    assert response.status_code == 201, response.text


async def new_type(http: httpx.AsyncClient, server: ServerProcess, prefix: str = "kind") -> str:
    """Register a type with a fresh name; returns the name."""
    name = unique_id(prefix).replace("-", "_")
    await register_type(http, server, name)
    return name


async def spawn_entity(
    http: httpx.AsyncClient, server: ServerProcess, type_name: str, **body: Any
) -> dict[str, Any]:
    """Spawn a new entity of `type_name` with `body`; returns the public entity."""
    url = f"{server.origin}/_electric/entities/{type_name}/{unique_id()}"
    response = await http.put(url, json=body)
    assert response.status_code == 201, response.text
    entity: dict[str, Any] = response.json()
    return entity


async def spawn(http: httpx.AsyncClient, server: ServerProcess, type_name: str) -> httpx.Response:
    """Spawn a new entity of `type_name` through the API."""
    url = f"{server.origin}/_electric/entities/{type_name}/{unique_id()}"
    response = await http.put(url, json={})
    assert response.status_code == 201, response.text
    return response


async def seed_entity(
    db: asyncpg.Connection,
    http: httpx.AsyncClient,
    server: ServerProcess,
    type_name: str,
    *,
    status: str = "idle",
) -> str:
    """A spawned entity, then put in `status` directly (no route reaches most statuses
    yet); returns its URL."""
    url: str = (await spawn(http, server, type_name)).json()["url"]
    if status != "idle":
        await set_status(db, url, status)
    return url


async def set_status(db: asyncpg.Connection, url: str, status: str) -> None:
    await db.execute(
        "UPDATE entities SET status = $3 WHERE tenant_id = $1 AND url = $2", TENANT, url, status
    )


async def status_of(db: asyncpg.Connection, url: str) -> str:
    entity = await get_entity(db, TENANT, url)
    assert entity is not None, url
    return entity.status


async def mint_token(db: asyncpg.Connection, url: str, wake_id: str | None = None) -> str:
    return await mint_write_token(db, TENANT, url, wake_id or unique_id("wake"))


async def add_wake_registration(db: asyncpg.Connection, subscriber: str, source: str) -> None:
    await db.execute(
        """
        INSERT INTO wake_registrations (tenant_id, subscriber_url, source_url, condition)
        VALUES ($1, $2, $3, '"runFinished"'::jsonb)
        """,
        TENANT,
        subscriber,
        source,
    )


async def wake_registrations_touching(db: asyncpg.Connection, url: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        """
        SELECT subscriber_url, source_url FROM wake_registrations
        WHERE tenant_id = $1 AND (subscriber_url = $2 OR source_url = $2)
        ORDER BY id
        """,
        TENANT,
        url,
    )
    return [(row["subscriber_url"], row["source_url"]) for row in rows]


# --- reading --------------------------------------------------------------------------------


async def read_events(http: httpx.AsyncClient, server: ServerProcess, path: str) -> list[Any]:
    """Every event of a JSON stream (`path` like `/chat/a1/main`)."""
    values: list[Any] = []
    offset = "-1"
    for _ in range(1000):
        response = await http.get(server.origin + path, params={"offset": offset})
        assert response.status_code == 200, (response.status_code, response.text)
        values.extend(response.json())
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return values
    raise AssertionError("catch-up never reached Stream-Up-To-Date")


async def is_closed(http: httpx.AsyncClient, server: ServerProcess, path: str) -> bool:
    head = await http.head(server.origin + path)
    assert head.status_code == 200, head.status_code
    return head.headers.get("Stream-Closed") == "true"


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a post-append hook (they run after the response is sent)."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

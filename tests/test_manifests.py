"""Manifest side effects (spec/03 §3.6) against real `electric-agents serve` processes:
entries a handler appends drive the `entity_manifest_sources` index with the append, forks
materialise the remapped entries, and a restart re-derives the registry from the streams.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from agents_support import (
    TENANT,
    eventually,
    mint_token,
    new_type,
    read_events,
    spawn_entity,
    unique_id,
)
from conftest import ServerFactory, ServerProcess

pytestmark = pytest.mark.timeout(120)


async def write_manifest(
    http: httpx.AsyncClient,
    server: ServerProcess,
    db: Any,
    owner: str,
    key: str,
    value: dict[str, Any] | None,
) -> None:
    event: dict[str, Any] = {"type": "manifest", "key": key}
    if value is None:
        event["headers"] = {"operation": "delete"}
    else:
        event["value"] = {"key": key, **value}
        event["headers"] = {"operation": "upsert"}
    token = await mint_token(db, owner)
    answer = await http.post(
        server.origin + f"{owner}/main", json=[event], headers={"electric-claim-token": token}
    )
    assert answer.status_code in (200, 204), answer.text


async def entity_sources(db: Any, owner: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        """
        SELECT manifest_key, source_ref FROM entity_manifest_sources
        WHERE tenant_id = $1 AND owner_entity_url = $2 ORDER BY manifest_key
        """,
        TENANT,
        owner,
    )
    return [(row["manifest_key"], row["source_ref"]) for row in rows]


async def registrations(db: Any, subscriber: str) -> list[tuple[str, str | None]]:
    rows = await db.fetch(
        """
        SELECT source_url, manifest_key FROM wake_registrations
        WHERE tenant_id = $1 AND subscriber_url = $2 ORDER BY manifest_key, source_url
        """,
        TENANT,
        subscriber,
    )
    return [(row["source_url"], row["manifest_key"]) for row in rows]


def entities_source(ref: str) -> dict[str, Any]:
    return {
        "kind": "source",
        "sourceType": "entities",
        "sourceRef": ref,
        "config": {"tags": {"team": "a"}},
        "wake": {"on": "change"},
    }


@pytest.fixture
async def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("serve")


async def test_entities_sources_follow_the_manifest_with_the_append(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    owner = (await spawn_entity(http, server, await new_type(http, server, "manifested")))["url"]
    key = "source:entities:0123456789abcdef"
    await write_manifest(http, server, db, owner, key, entities_source("0123456789abcdef"))
    # Synced in the append's transaction: visible as soon as the append answered.
    assert await entity_sources(db, owner) == [(key, "0123456789abcdef")]
    assert await registrations(db, owner) == [("/_entities/0123456789abcdef", key)]

    # Another kind of entry at the key drops the row; a delete drops the wake too.
    await write_manifest(http, server, db, owner, key, {"kind": "effect", "id": "x"})
    assert await entity_sources(db, owner) == []
    await write_manifest(http, server, db, owner, key, entities_source("fedcba9876543210"))
    assert await entity_sources(db, owner) == [(key, "fedcba9876543210")]
    await write_manifest(http, server, db, owner, key, None)
    assert await entity_sources(db, owner) == []
    assert await registrations(db, owner) == []


async def test_a_fork_materialises_the_remapped_manifest(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    kind = await new_type(http, server, "manifested")
    root = (await spawn_entity(http, server, kind))["url"]
    child = (await spawn_entity(http, server, kind, parent=root))["url"]
    _, _, child_id = child.split("/")
    child_key = f"child:{kind}:{child_id}"
    await write_manifest(
        http,
        server,
        db,
        root,
        child_key,
        {
            "kind": "child",
            "id": child_id,
            "entity_type": kind,
            "entity_url": child,
            "observed": True,
            "wake": {"on": "runFinished", "includeResponse": True},
        },
    )
    ref_key = "source:entities:00000000000000aa"
    await write_manifest(http, server, db, root, ref_key, entities_source("00000000000000aa"))

    answer = await http.post(server.origin + f"/_electric/entities{root}/fork", json={})
    assert answer.status_code == 201, answer.text
    fork_root, fork_child = (entity["url"] for entity in answer.json()["entities"])
    fork_child_key = f"child:{kind}:{fork_child.split('/')[2]}"
    assert await registrations(db, fork_root) == [
        (fork_child, fork_child_key),
        ("/_entities/00000000000000aa", ref_key),
    ]
    assert await entity_sources(db, fork_root) == [(ref_key, "00000000000000aa")]
    # The source keeps its own.
    assert await registrations(db, root) == [
        (child, child_key),
        ("/_entities/00000000000000aa", ref_key),
    ]


async def test_a_restart_rebuilds_the_registry_from_the_streams(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    """Registrations, entity sources and a pending future send that a handler's manifest
    asks for come back after they were lost from the registry."""
    kind = await new_type(http, server, "manifested")
    owner = (await spawn_entity(http, server, kind))["url"]
    watched = (await spawn_entity(http, server, kind))["url"]
    await write_manifest(
        http,
        server,
        db,
        owner,
        "observe:w",
        {"kind": "observe", "entity_url": watched, "wake": {"on": "change", "ops": ["insert"]}},
    )
    ref_key = "source:entities:00000000000000bb"
    await write_manifest(http, server, db, owner, ref_key, entities_source("00000000000000bb"))
    fire_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)).isoformat()
    await write_manifest(
        http,
        server,
        db,
        owner,
        "schedule:later",
        {
            "kind": "schedule",
            "id": "later",
            "scheduleType": "future_send",
            "fireAt": fire_at,
            "targetUrl": watched,
            "payload": {"hello": "again"},
            "producerId": f"future-send-{unique_id()}",
            "status": "pending",
        },
    )

    async def scheduled() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM scheduled_tasks"))

    await eventually(scheduled, "the future send's task")
    server.kill9()
    # The registry loses everything the manifest derived.
    await db.execute("DELETE FROM wake_registrations WHERE subscriber_url = $1", owner)
    await db.execute("DELETE FROM entity_manifest_sources WHERE owner_entity_url = $1", owner)
    await db.execute("DELETE FROM scheduled_tasks")
    server.restart()

    async def rebuilt() -> bool:
        return len(await registrations(db, owner)) == 2 and bool(await entity_sources(db, owner))

    await eventually(rebuilt, "the registry re-derived from the manifest")
    assert await registrations(db, owner) == [
        (watched, "observe:w"),
        ("/_entities/00000000000000bb", ref_key),
    ]

    async def delivered() -> bool:
        events = await read_events(http, server, f"{watched}/main")
        return any(
            e.get("type") == "inbox" and e["value"].get("payload") == {"hello": "again"}
            for e in events
        )

    await eventually(delivered, "the future send after the restart")

"""The recovery sweep (agents/recovery.py) against a real `electric-agents serve`: after a
kill -9, entities whose run nothing is running any more are finished, entities with a live
wake or a recent start are left alone, and registrations of terminal subscribers go.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from agents_support import (
    TENANT,
    eventually,
    is_closed,
    new_type,
    spawn_entity,
    status_of,
    unique_id,
)
from conftest import ServerFactory, ServerProcess

pytestmark = pytest.mark.timeout(120)

LONG_AGO_MS = 1_000_000  # an updated_at far before any grace period


@pytest.fixture
async def server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("serve")


async def force(db: Any, url: str, status: str, updated_at: int) -> None:
    await db.execute(
        "UPDATE entities SET status = $3, updated_at = $4 WHERE tenant_id = $1 AND url = $2",
        TENANT,
        url,
        status,
        updated_at,
    )


async def test_stranded_runs_are_finished_after_a_crash(
    http: httpx.AsyncClient, server: ServerProcess, db: Any
) -> None:
    kind = await new_type(http, server, "recovered")
    stranded_running = (await spawn_entity(http, server, kind))["url"]
    stranded_stopping = (await spawn_entity(http, server, kind))["url"]
    just_started = (await spawn_entity(http, server, kind))["url"]
    with_live_wake = (await spawn_entity(http, server, kind))["url"]
    killed_subscriber = (await spawn_entity(http, server, kind))["url"]

    server.kill9()
    await force(db, stranded_running, "running", LONG_AGO_MS)
    await force(db, stranded_stopping, "stopping", LONG_AGO_MS)
    recent = int(await db.fetchval("SELECT (extract(epoch FROM now()) * 1000)::bigint"))
    await force(db, just_started, "running", recent)
    await force(db, with_live_wake, "running", LONG_AGO_MS)
    await db.execute(
        """
        INSERT INTO ds_subscriptions (id, type, webhook_url, lease_ttl_ms, config_hash,
                                      wake_id, wake_state, wake_path)
        VALUES ($1, 'webhook', 'http://127.0.0.1:9/', 30000, 'x', 'w-live', 'delivered', $2)
        """,
        unique_id("sub"),
        with_live_wake.lstrip("/") + "/main",
    )
    await force(db, killed_subscriber, "killed", LONG_AGO_MS)
    await db.execute(
        """
        INSERT INTO wake_registrations (tenant_id, subscriber_url, source_url, condition)
        VALUES ($1, $2, $3, '"runFinished"'::jsonb)
        """,
        TENANT,
        killed_subscriber,
        stranded_running,
    )
    server.restart()

    async def recovered() -> bool:
        return (
            await status_of(db, stranded_running) == "idle"
            and await status_of(db, stranded_stopping) == "stopped"
        )

    await eventually(recovered, "the stranded runs to finish")
    # stopping -> stopped is a full terminal entry: streams closed.
    assert await is_closed(http, server, f"{stranded_stopping}/main")
    assert await status_of(db, just_started) == "running"
    assert await status_of(db, with_live_wake) == "running"
    left = await db.fetchval(
        "SELECT count(*) FROM wake_registrations WHERE subscriber_url = $1", killed_subscriber
    )
    assert left == 0

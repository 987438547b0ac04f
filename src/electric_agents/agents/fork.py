"""Subtree fork: `POST /_electric/entities/:type/:instanceId/fork` (spec/02 §3.4, spec/03
§5.4, §3.5.10).

The reference waits for a quiet subtree, takes process-local "work" and "write" locks (so
sends, deliveries and appends meanwhile get 409 FORK_IN_PROGRESS), then forks stream by
stream, inserts rows one by one and, on failure, deletes what it created on a best-effort
basis. Its locks do not hold across server instances, and a crash mid-fork leaves
half a fork behind.

Here the wait happens outside any transaction, and the fork itself is ONE transaction: it
locks the subtree's entity rows and source streams (so a concurrent send, status change or
append waits for the fork to commit instead of failing, in this process or any other),
re-checks that the subtree is quiet, forks every stream copy-on-write, appends the
reconciliation events, inserts the rows and links dispatch. Any error, or a crash, rolls all
of it back; nothing needs cleaning up.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from electric_agents.agents import events
from electric_agents.agents.dispatch_links import link_dispatch
from electric_agents.agents.entity_store import (
    ENTITY_COLUMNS,
    TERMINAL_STATUSES,
    Entity,
    entity_from_row,
    insert_entity,
    now_ms,
)
from electric_agents.agents.manifests import materialize
from electric_agents.agents.principal_entities import reject_principal_mutation
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.errors import ApiError
from electric_agents.streams import store
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.lifecycle import CreateSpec
from electric_agents.streams.model import StreamMeta

DEFAULT_WAIT_TIMEOUT_MS = 120_000
WAIT_POLL_S = 0.25
QUIET_STATUSES = frozenset({"idle", "paused"})
SHARED_STATE_PREFIX = "/_electric/shared-state/"
# Stream rows that forks rewrite (spec/03 §5.4 step 2).
_SNAPSHOT_TYPES = ("manifest", "child_status", "replay_watermark")


@dataclass(frozen=True)
class ForkRequest:
    instance_id: str | None = None
    wait_timeout_ms: float = DEFAULT_WAIT_TIMEOUT_MS


@dataclass(frozen=True)
class ForkResult:
    root: Entity
    entities: list[Entity]  # root first, then breadth-first


def parse_fork_request(document: dict[str, Any]) -> ForkRequest:
    """The body after schema validation: argument checks of spec/02 §3.4."""
    timeout = document.get("waitTimeoutMs", DEFAULT_WAIT_TIMEOUT_MS)
    valid = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not valid or not math.isfinite(timeout) or timeout < 0:
        raise ApiError(400, "INVALID_REQUEST", "waitTimeoutMs must be a non-negative number")
    instance_id = document.get("instance_id")
    if instance_id is not None and (not instance_id or "/" in instance_id):
        raise ApiError(
            400,
            "INVALID_REQUEST",
            "Fork instance_id must not be empty or contain forward slashes",
        )
    return ForkRequest(instance_id=instance_id, wait_timeout_ms=float(timeout))


async def fork_subtree(
    runtime: AgentsRuntime,
    source: Entity,
    request: ForkRequest,
    check_owner: Callable[[asyncpg.Connection, dict[str, Any] | None], Any],
) -> ForkResult:
    """Wait (polling) until the subtree is quiet, then fork it in one transaction.
    `check_owner` is the spawn's runner-ownership check, applied to the source's policy."""
    reject_principal_mutation(source, "forked")
    async with runtime.pool.acquire() as conn:
        await check_owner(conn, source.dispatch_policy)
    deadline = time.monotonic() + request.wait_timeout_ms / 1000
    while True:
        async with runtime.pool.acquire() as conn:
            subtree = await _load_subtree(conn, runtime.tenant_id, source.url, lock=False)
        active = _active(subtree)
        if not active:
            result = await _fork_if_quiet(runtime, source.url, request)
            if result is not None:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            async with runtime.pool.acquire() as conn:
                subtree = await _load_subtree(conn, runtime.tenant_id, source.url, lock=False)
            raise ApiError(
                409,
                "FORK_WAIT_TIMEOUT",
                "Timed out waiting for subtree to become idle",
                details={"active": _active(subtree)},
            )
        await asyncio.sleep(min(WAIT_POLL_S, remaining))


def _active(subtree: list[Entity]) -> list[str]:
    return [entity.url for entity in subtree if entity.status not in QUIET_STATUSES]


_SUBTREE = f"""
WITH RECURSIVE tree AS (
    SELECT url, 0 AS depth FROM entities WHERE tenant_id = $1 AND url = $2
    UNION ALL
    SELECT e.url, t.depth + 1 FROM entities e JOIN tree t ON e.parent = t.url
    WHERE e.tenant_id = $1
)
SELECT {ENTITY_COLUMNS} FROM entities JOIN tree USING (url)
WHERE entities.tenant_id = $1
ORDER BY tree.depth, entities.created_at, entities.url
"""


async def _load_subtree(
    conn: asyncpg.Connection, tenant: str, root_url: str, *, lock: bool
) -> list[Entity]:
    """The root and its descendants, breadth-first; 404 / 400 / 409 as spec/02 §3.4 says.
    With `lock`, every row is locked (in URL order, so two forks cannot deadlock), and the
    tree is re-read until no child appeared meanwhile."""
    while True:
        subtree = [entity_from_row(row) for row in await conn.fetch(_SUBTREE, tenant, root_url)]
        if not subtree:
            raise ApiError(404, "NOT_FOUND", "Entity not found")
        if subtree[0].parent is not None:
            raise ApiError(400, "INVALID_REQUEST", "Only top-level entities can be forked")
        if lock:
            urls = sorted(entity.url for entity in subtree)
            await conn.execute(
                """
                SELECT 1 FROM entities WHERE tenant_id = $1 AND url = ANY($2::text[])
                ORDER BY url FOR UPDATE
                """,
                tenant,
                urls,
            )
            again = [entity_from_row(row) for row in await conn.fetch(_SUBTREE, tenant, root_url)]
            if sorted(entity.url for entity in again) != urls:
                continue  # a child was spawned meanwhile: lock it too
            subtree = again
        for entity in subtree:
            if entity.status in TERMINAL_STATUSES:
                raise ApiError(409, "NOT_RUNNING", f'Cannot fork terminal entity "{entity.url}"')
        return subtree


async def _fork_if_quiet(
    runtime: AgentsRuntime, root_url: str, request: ForkRequest
) -> ForkResult | None:
    """The fork transaction; None (nothing written) if the subtree became busy."""
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        conn = tx.conn
        subtree = await _load_subtree(conn, tenant, root_url, lock=True)
        if _active(subtree):
            return None
        # Locking the source streams holds back appends to them until the fork commits.
        stream_paths = sorted(
            events.stream_path(path)
            for entity in subtree
            for path in (entity.main_stream, entity.error_stream)
        )
        metas = await store.lock_metas(conn, stream_paths)
        snapshots = {
            entity.url: await _snapshot(conn, metas.get(events.stream_path(entity.main_stream)))
            for entity in subtree
        }
        shared_ids = sorted(
            {shared for snapshot in snapshots.values() for shared in _shared_state_ids(snapshot)}
        )
        shared_metas = await store.lock_metas(
            conn, [events.stream_path(SHARED_STATE_PREFIX + shared) for shared in shared_ids]
        )
        names = await _Naming.build(conn, tenant, subtree, request.instance_id, shared_ids)
        forks = _plan(subtree, names)
        for entity, forked in zip(subtree, forks, strict=True):
            for source_url, target_url in (
                (entity.main_stream, forked.main_stream),
                (entity.error_stream, forked.error_stream),
            ):
                await _fork_stream(tx, source_url, target_url)
        for shared in shared_ids:
            source_path = events.stream_path(SHARED_STATE_PREFIX + shared)
            if source_path in shared_metas:
                await _fork_stream(
                    tx, SHARED_STATE_PREFIX + shared, SHARED_STATE_PREFIX + names.shared[shared]
                )
        txid = f"fork-{uuid.uuid4()}"
        for entity, forked in zip(subtree, forks, strict=True):
            reconciliation = _reconciliation_events(
                entity, forked, snapshots[entity.url], names, txid
            )
            for event in reconciliation:
                await tx.append(
                    events.stream_path(forked.main_stream),
                    content_type=events.JSON_CONTENT_TYPE,
                    body=events.encode(event),
                )
        for forked in forks:
            if not await insert_entity(conn, tenant, forked):
                raise ApiError(409, "DUPLICATE_URL", f'Entity already exists at URL "{forked.url}"')
        for entity, forked in zip(subtree, forks, strict=True):
            await link_dispatch(
                conn, tenant, forked, on_subscription_created=runtime.on_subscription_created
            )
            # Wakes, entity sources, future sends and cron chains of the forked manifests.
            remapped = dict(
                _remap_manifest(key, value, names)
                for key, value in snapshots[entity.url]["manifest"].items()
            )
            await materialize(tx, tenant, forked, remapped, runtime.settings.event_sources)
    return ForkResult(root=forks[0], entities=forks)


async def _fork_stream(tx: StreamTransaction, source_url: str, target_url: str) -> None:
    result = await tx.create(
        CreateSpec(
            path=events.stream_path(target_url),
            content_type=None,
            forked_from_path=events.stream_path(source_url),
        )
    )
    if not result.created:
        raise ApiError(409, "DUPLICATE_URL", f'Stream already exists at "{target_url}"')


# --- snapshot ------------------------------------------------------------------------------


Snapshot = dict[str, dict[str, Any]]  # event type -> key -> last value


async def _snapshot(conn: asyncpg.Connection, meta: StreamMeta | None) -> Snapshot:
    """The last value per key of the rows a fork rewrites (a delete removes the key)."""
    snapshot: Snapshot = {kind: {} for kind in _SNAPSHOT_TYPES}
    if meta is None:
        return snapshot
    for event in await store.read_json_values(conn, meta):
        if isinstance(event, dict) and event.get("type") in snapshot:
            _reduce_event(snapshot, event)
    return snapshot


def _reduce_event(snapshot: Snapshot, event: dict[str, Any]) -> None:
    key = event.get("key")
    if not isinstance(key, str):
        return
    rows = snapshot[event["type"]]
    headers = event.get("headers")
    operation = headers.get("operation") if isinstance(headers, dict) else None
    if operation == "delete":
        rows.pop(key, None)
    elif "value" in event:
        rows[key] = event["value"]


def _shared_state_ids(snapshot: Snapshot) -> set[str]:
    found: set[str] = set()
    for value in snapshot["manifest"].values():
        if not isinstance(value, dict):
            continue
        if value.get("kind") == "shared-state" and isinstance(value.get("id"), str):
            found.add(value["id"])
        elif value.get("kind") == "source" and value.get("sourceType") == "db":
            config = value.get("config") if isinstance(value.get("config"), dict) else {}
            for candidate in (value.get("sourceRef"), config.get("id")):
                if isinstance(candidate, str) and candidate:
                    found.add(candidate)
    return found


# --- naming --------------------------------------------------------------------------------


@dataclass
class _Naming:
    urls: dict[str, str]  # source entity URL -> fork URL
    shared: dict[str, str]  # source shared-state id -> fork id
    strings: dict[str, str]  # every string a fork rewrites (URLs, stream paths, ids)

    @classmethod
    async def build(
        cls,
        conn: asyncpg.Connection,
        tenant: str,
        subtree: list[Entity],
        root_instance_id: str | None,
        shared_ids: list[str],
    ) -> _Naming:
        suffix = secrets.token_hex(4)
        taken: set[str] = set()
        urls: dict[str, str] = {}
        for index, entity in enumerate(subtree):
            type_name, instance_id = _split_url(entity.url)
            if index == 0 and root_instance_id is not None:
                url = f"/{type_name}/{root_instance_id}"
                if await _entity_exists(conn, tenant, url):
                    raise ApiError(409, "DUPLICATE_URL", f'Entity already exists at URL "{url}"')
            else:
                base = f"/{type_name}/{instance_id}-fork-{suffix}"
                url = base
                counter = 0
                while url in taken or await _entity_exists(conn, tenant, url):
                    counter += 1
                    url = f"{base}-{counter}"
            taken.add(url)
            urls[entity.url] = url
        shared: dict[str, str] = {}
        for shared_id in shared_ids:
            base = f"{shared_id}-fork-{suffix}"
            candidate = base
            counter = 0
            while candidate in shared.values() or await store.get_meta(
                conn, events.stream_path(SHARED_STATE_PREFIX + candidate)
            ):
                counter += 1
                candidate = f"{base}-{counter}"
            shared[shared_id] = candidate
        strings: dict[str, str] = {}
        for source_url, fork_url in urls.items():
            strings[source_url] = fork_url
            strings[f"{source_url}/main"] = f"{fork_url}/main"
            strings[f"{source_url}/error"] = f"{fork_url}/error"
        for source_id, fork_id in shared.items():
            strings[source_id] = fork_id
            strings[SHARED_STATE_PREFIX + source_id] = SHARED_STATE_PREFIX + fork_id
        return cls(urls=urls, shared=shared, strings=strings)

    def remap(self, value: Any) -> Any:
        """Exact-string values replaced through the map, recursively."""
        if isinstance(value, str):
            return self.strings.get(value, value)
        if isinstance(value, list):
            return [self.remap(item) for item in value]
        if isinstance(value, dict):
            return {key: self.remap(item) for key, item in value.items()}
        return value


def _split_url(url: str) -> tuple[str, str]:
    _, type_name, instance_id = url.split("/", 2)
    return type_name, instance_id


async def _entity_exists(conn: asyncpg.Connection, tenant: str, url: str) -> bool:
    found = await conn.fetchval(
        "SELECT 1 FROM entities WHERE tenant_id = $1 AND url = $2", tenant, url
    )
    return found is not None


# --- plans and reconciliation events ---------------------------------------------------------


def _plan(subtree: list[Entity], names: _Naming) -> list[Entity]:
    now = now_ms()
    forks = []
    for entity in subtree:
        url = names.urls[entity.url]
        type_name, _ = _split_url(url)
        forks.append(
            replace(
                entity,
                url=url,
                type=type_name,
                status="idle",
                subscription_id=f"{type_name}-handler",
                write_token=str(uuid.uuid4()),
                tags=dict(entity.tags),
                spawn_args=names.remap(entity.spawn_args or {}),
                parent=names.urls.get(entity.parent) if entity.parent else None,
                created_at=now,
                updated_at=now,
            )
        )
    return forks


def _reconciliation_events(
    source: Entity, forked: Entity, snapshot: Snapshot, names: _Naming, txid: str
) -> list[dict[str, Any]]:
    """spec/03 §5.4 step 6.3, in the reference's order and key order."""

    def event(kind: str, key: str, value: Any, operation: str) -> dict[str, Any]:
        out: dict[str, Any] = {"type": kind, "key": key}
        if operation != "delete":
            out["value"] = value
        out["headers"] = {"txid": txid, "forkedFrom": source.url, "operation": operation}
        return out

    def moved(kind: str, key: str, new_key: str, value: Any) -> list[dict[str, Any]]:
        if new_key != key:
            return [event(kind, key, None, "delete"), event(kind, new_key, value, "insert")]
        return [event(kind, key, value, "update")]

    created: dict[str, Any] = {
        "entity_type": forked.type,
        "timestamp": events.iso_timestamp(forked.created_at),
        "args": forked.spawn_args or {},
    }
    if forked.parent is not None:
        created["parent_url"] = forked.parent
    out = [event("entity_created", "entity-created", created, "update")]
    for key, value in snapshot["manifest"].items():
        new_key, new_value = _remap_manifest(key, value, names)
        if new_key != key or new_value != value:
            out.extend(moved("manifest", key, new_key, new_value))
    for key, value in snapshot["child_status"].items():
        if isinstance(value, dict) and value.get("entity_url") in names.urls:
            fork_url = names.urls[value["entity_url"]]
            updated = {**value, "entity_url": fork_url, "entity_type": _split_url(fork_url)[0]}
            out.append(event("child_status", key, updated, "update"))
    for key, value in snapshot["replay_watermark"].items():
        if isinstance(value, dict) and value.get("source_id") in names.strings:
            new_source = names.strings[value["source_id"]]
            new_key = new_source if key == value["source_id"] else key
            out.extend(moved("replay_watermark", key, new_key, {**value, "source_id": new_source}))
    return out


def _remap_manifest(key: str, value: Any, names: _Naming) -> tuple[str, Any]:
    """spec/03 §5.4 step 6.3: the entry kinds whose references move with the fork.
    References outside the subtree stay as they are."""
    if not isinstance(value, dict):
        return key, value
    kind = value.get("kind")
    if kind == "child" and value.get("entity_url") in names.urls:
        fork_url = names.urls[value["entity_url"]]
        type_name, fork_id = _split_url(fork_url)
        new_key = f"child:{type_name}:{fork_id}"
        return new_key, {**value, "key": new_key, "entity_url": fork_url, "id": fork_id}
    if kind == "shared-state" and value.get("id") in names.shared:
        fork_id = names.shared[value["id"]]
        new_key = f"shared-state:{fork_id}"
        return new_key, {**value, "key": new_key, "id": fork_id}
    config = value.get("config") if isinstance(value.get("config"), dict) else {}
    if kind == "source" and value.get("sourceType") == "entity":
        source_url = config.get("entityUrl", value.get("sourceRef"))
        if source_url in names.urls:
            fork_url = names.urls[source_url]
            new_key = f"source:entity:{fork_url}"
            new_config = {
                **config,
                "entityUrl": fork_url,
                "streamPath": f"{fork_url}/main",
                "entityType": _split_url(fork_url)[0],
            }
            return new_key, {**value, "key": new_key, "sourceRef": fork_url, "config": new_config}
    if kind == "source" and value.get("sourceType") == "db":
        source_id = value.get("sourceRef", config.get("id"))
        if source_id in names.shared:
            fork_id = names.shared[source_id]
            new_key = f"source:db:{fork_id}"
            new_config = {**config, "id": fork_id}
            return new_key, {**value, "key": new_key, "sourceRef": fork_id, "config": new_config}
    if kind == "schedule" and value.get("scheduleType") == "future_send":
        updated = dict(value)
        for field in ("targetUrl", "senderUrl"):
            if value.get(field) in names.urls:
                updated[field] = names.urls[value[field]]
        return key, updated
    return key, value

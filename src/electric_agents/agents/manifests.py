"""Manifest side effects (spec/03 §3.6): what `manifest` entries in an entity's main stream
make the server do, and how the registry is re-derived from them.

Three moments apply them (spec/03 §3.6.3):

* a handler appends `manifest` events through the stream proxy: wake registrations and the
  `entity_manifest_sources` index are synced in the append's own transaction (here and in
  `manifest_wakes`); future sends and cron chains right after it (`schedules`);
* a fork materialises every active entry of each forked entity, in the fork's transaction;
* startup re-derives all of it from the last manifest event per key of every live entity
  (`ManifestRehydrator`), so the registry can be rebuilt from the streams and anything a
  crash cut short between an append and its after-append effects is repaired.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson

from electric_agents.agents.entity_store import Entity, get_entity
from electric_agents.agents.event_source_catalog import EventSourceCatalog
from electric_agents.agents.manifest_wakes import (
    manifest_events,
    manifest_wake_spec,
    sync_manifest_wakes,
)
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.schedules import sync_manifest_entry
from electric_agents.agents.wake_registration_store import upsert_registration
from electric_agents.errors import ApiError
from electric_agents.streams import store
from electric_agents.streams.engine import StreamTransaction

log = logging.getLogger(__name__)

REHYDRATE_BATCH = 200

Entries = dict[str, dict[str, Any]]  # manifest key -> the entry's current value


def active_entries(events: Iterable[Any]) -> Entries:
    """The last value per key (a delete removes the key): what a manifest says now."""
    entries: Entries = {}
    for key, operation, value in manifest_events(events):
        if operation == "delete" or not isinstance(value, dict):
            entries.pop(key, None)
        else:
            entries[key] = value
    return entries


# --- through the proxy -----------------------------------------------------------------------


async def sync_in_transaction(
    conn: asyncpg.Connection,
    tenant: str,
    owner_url: str,
    events: list[Any],
    catalog: EventSourceCatalog | None = None,
) -> None:
    """The side effects that commit with a handler's manifest append."""
    await sync_manifest_wakes(conn, tenant, owner_url, events, catalog)
    for key, operation, value in manifest_events(events):
        entry = value if operation != "delete" and isinstance(value, dict) else None
        await sync_entity_source(conn, tenant, owner_url, key, entry)


async def sync_entity_source(
    conn: asyncpg.Connection, tenant: str, owner_url: str, key: str, entry: dict[str, Any] | None
) -> None:
    """`entity_manifest_sources` holds a row exactly while the owner's entry at `key` is an
    `entities` source with a string `sourceRef` (spec/03 §1.2): it keeps the bridge alive."""
    source_ref = _entities_source_ref(entry)
    if source_ref is None:
        await conn.execute(
            """
            DELETE FROM entity_manifest_sources
            WHERE tenant_id = $1 AND owner_entity_url = $2 AND manifest_key = $3
            """,
            tenant,
            owner_url,
            key,
        )
        return
    await conn.execute(
        """
        INSERT INTO entity_manifest_sources (tenant_id, owner_entity_url, manifest_key, source_ref)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, owner_entity_url, manifest_key)
        DO UPDATE SET source_ref = EXCLUDED.source_ref, updated_at = now()
        """,
        tenant,
        owner_url,
        key,
        source_ref,
    )


def _entities_source_ref(entry: dict[str, Any] | None) -> str | None:
    if entry is None or entry.get("kind") != "source" or entry.get("sourceType") != "entities":
        return None
    ref = entry.get("sourceRef")
    return ref if isinstance(ref, str) and ref else None


# --- materialising whole manifests (fork, startup) ------------------------------------------


async def materialize(
    tx: StreamTransaction,
    tenant: str,
    owner: Entity,
    entries: Entries,
    catalog: EventSourceCatalog | None = None,
) -> None:
    """Apply every active entry of `owner`'s manifest in `tx`: its wake registration (an
    identical one is kept, with its timeout clock), its entities-source row, its pending
    future send and its cron chain. An entry the server cannot apply (a bad cron
    expression, say) is logged and skipped, as the reference does, rather than failing the
    rest."""
    for key, entry in entries.items():
        try:
            async with tx.conn.transaction():  # a savepoint per entry
                spec = manifest_wake_spec(owner.url, key, entry, catalog)
                if spec is not None:
                    await upsert_registration(tx.conn, tenant, spec)
                await sync_entity_source(tx.conn, tenant, owner.url, key, entry)
                await sync_manifest_entry(tx, tenant, owner, key, "upsert", entry)
        except ApiError as error:
            log.warning("manifest entry %s of %s not applied: %s", key[:200], owner.url, error)


class ManifestRehydrator:
    """Startup re-derivation (spec/03 §6.6 step 3.2), for every entity that is not terminal:
    reads the manifest events of its main stream and materialises what they say now. Runs in
    the background after startup, a batch of entities per pass, one transaction per entity."""

    def __init__(self, runtime: AgentsRuntime) -> None:
        self.runtime = runtime

    async def run(self) -> None:
        applied = 0
        after = ""
        while True:
            async with self.runtime.pool.acquire() as conn:
                urls = await conn.fetch(
                    """
                    SELECT url FROM entities
                    WHERE tenant_id = $1 AND url > $2 AND status NOT IN ('stopped', 'killed')
                    ORDER BY url LIMIT $3
                    """,
                    self.runtime.tenant_id,
                    after,
                    REHYDRATE_BATCH,
                )
            if not urls:
                break
            for row in urls:
                try:
                    applied += await self.rehydrate(row["url"])
                except (ApiError, asyncpg.PostgresError, orjson.JSONDecodeError) as error:
                    log.warning("manifest rehydration of %s failed: %s", row["url"], error)
            after = urls[-1]["url"]
        if applied:
            log.info("re-derived %d manifest entries from entity streams", applied)

    async def rehydrate(self, entity_url: str) -> int:
        tenant = self.runtime.tenant_id
        async with self.runtime.engine.transaction() as tx:
            # The owner's row lock orders this with expiries and schedule changes of it.
            owner = await get_entity(tx.conn, tenant, entity_url, for_update=True)
            if owner is None or owner.is_terminal:
                return 0
            entries = active_entries(await _manifest_values(tx.conn, owner.main_stream))
            # The index is rebuilt from the stream: rows of entries that are gone go too.
            await tx.conn.execute(
                """
                DELETE FROM entity_manifest_sources
                WHERE tenant_id = $1 AND owner_entity_url = $2 AND NOT (manifest_key = ANY($3))
                """,
                tenant,
                owner.url,
                list(entries),
            )
            await materialize(tx, tenant, owner, entries, self.runtime.settings.event_sources)
        return len(entries)


async def _manifest_values(conn: asyncpg.Connection, stream_url: str) -> list[Any]:
    """The values of a JSON stream's messages that mention a `manifest` event, in order."""
    meta = await store.get_meta(conn, stream_url.lstrip("/"))
    if meta is None:
        return []
    return await store.read_json_values(conn, meta, mentioning=b'"manifest"')

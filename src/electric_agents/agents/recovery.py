"""Recovery sweep (spec/03 §6.5-6.6; issue: "entities are not left stuck in `running`, and
registrations of dead entities are cleaned up").

Every state change here is transactional, so a crash cannot leave an entity `running`
with its wake already settled, except through windows the reference also has (a handler
that answered `{"done":true}` itself, or a done whose status change failed to commit). The
sweep runs at startup and then every minute, in every process (each step is idempotent and
takes the entity's row lock):

* an entity `running` or `stopping` for longer than the grace period, with no outstanding
  wake on its main stream and no active runner claim, has nothing running any more: its run
  is finished as a done would finish it (`running → idle`, `stopping → stopped` with the
  full terminal cleanup);
* wake registrations whose subscriber is terminal are deleted (terminal entry deletes them
  in its own transaction; this catches rows written around it, e.g. by `POST /_electric/wake`).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from electric_agents.agents.entity_store import now_ms
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.signals import on_run_finished
from electric_agents.errors import ApiError

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0
# A wake sets `running` before its delivery starts; give it this long to appear.
GRACE_MS = 60_000

_STRANDED_CONDITION = """
e.tenant_id = $1 AND e.status IN ('running', 'stopping') AND e.updated_at < $2
  AND NOT EXISTS (
      SELECT 1 FROM ds_subscriptions s
      WHERE s.wake_path = ltrim(e.url, '/') || '/main')
  AND NOT EXISTS (
      SELECT 1 FROM consumer_claims c
      WHERE c.tenant_id = e.tenant_id AND c.entity_url = e.url AND c.status = 'active')
"""
_STRANDED = f"SELECT e.url FROM entities e WHERE {_STRANDED_CONDITION} ORDER BY e.url LIMIT 1000"
# The same question for one entity, asked again under its row lock.
_STILL_STRANDED = f"SELECT 1 FROM entities e WHERE {_STRANDED_CONDITION} AND e.url = $3"

_ORPHAN_REGISTRATIONS = """
DELETE FROM wake_registrations r
USING entities e
WHERE r.tenant_id = $1 AND e.tenant_id = r.tenant_id AND e.url = r.subscriber_url
  AND e.status IN ('stopped', 'killed')
"""


class RecoverySweep:
    def __init__(self, runtime: AgentsRuntime, grace_ms: int = GRACE_MS) -> None:
        self.runtime = runtime
        self.grace_ms = grace_ms

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("recovery sweep failed: %s", error)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def sweep(self) -> tuple[int, int]:
        """Returns (entities whose run was finished, registrations deleted)."""
        tenant = self.runtime.tenant_id
        async with self.runtime.pool.acquire() as conn:
            stranded = [
                row["url"] for row in await conn.fetch(_STRANDED, tenant, now_ms() - self.grace_ms)
            ]
            deleted = await conn.execute(_ORPHAN_REGISTRATIONS, tenant)
        finished = 0
        cutoff = now_ms() - self.grace_ms
        for url in stranded:

            async def still_stranded(conn: asyncpg.Connection, url: str = url) -> bool:
                # A wake that started since the query owns the entity: leave it alone.
                return bool(await conn.fetchval(_STILL_STRANDED, tenant, cutoff, url))

            try:
                change = await on_run_finished(self.runtime, url, release_claim=still_stranded)
            except ApiError as error:
                log.warning("could not finish the stranded run of %s: %s", url, error)
                continue
            if change.previous_state != change.new_state:
                finished += 1
                log.info(
                    "finished the stranded run of %s (%s -> %s)",
                    url,
                    change.previous_state,
                    change.new_state,
                )
        removed = int(deleted.split()[-1])
        if removed:
            log.info("deleted %d wake registrations of terminal subscribers", removed)
        return finished, removed

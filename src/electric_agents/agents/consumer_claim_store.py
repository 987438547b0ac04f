"""SQL for runner claims (spec/03 §1.2, §5.13): the durable `consumer_claims` row of each
pull-wake claim and the `active_*` fields of `entity_dispatch_state` that point at it.

Every function takes a connection so callers can join it to their own transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import orjson


@dataclass(frozen=True)
class ActiveClaim:
    """What a runner claim materialises (spec/03 `materializeActiveClaim`)."""

    consumer_id: str
    epoch: int
    entity_url: str
    stream_path: str
    runner_id: str
    lease_ttl_ms: int | None


async def materialize_active_claim(
    conn: asyncpg.Connection, tenant: str, claim: ActiveClaim
) -> None:
    """Upsert the active `consumer_claims` row and point the entity's dispatch state at it.

    Other claims of the entity still marked active are marked `expired`: the entity's
    subscription has one outstanding wake at a time, so a new claim means the older one lost
    its lease (the reference never expired them, so its health report kept them forever)."""
    lease_s = claim.lease_ttl_ms / 1000 if claim.lease_ttl_ms is not None else None
    await conn.execute(
        """
        WITH expired AS (
            UPDATE consumer_claims SET status = 'expired', updated_at = now()
            WHERE tenant_id = $1 AND entity_url = $4 AND status = 'active'
              AND NOT (consumer_id = $2 AND epoch = $3)
        ), claim AS (
            INSERT INTO consumer_claims (tenant_id, consumer_id, epoch, wake_id, entity_url,
                                         stream_path, runner_id, status, claimed_at,
                                         lease_expires_at, released_at, acked_streams,
                                         updated_at)
            VALUES ($1, $2, $3, $2, $4, $5, $6, 'active', now(),
                    now() + make_interval(secs => $7::float8), NULL, NULL, now())
            ON CONFLICT (tenant_id, consumer_id, epoch) DO UPDATE SET
                status = 'active', claimed_at = now(),
                lease_expires_at = EXCLUDED.lease_expires_at, released_at = NULL,
                acked_streams = NULL, updated_at = now()
        )
        INSERT INTO entity_dispatch_state (tenant_id, entity_url, active_consumer_id,
                                           active_runner_id, active_epoch, active_claimed_at,
                                           active_lease_expires_at, last_claimed_at,
                                           updated_at)
        VALUES ($1, $4, $2, $6, $3, now(), now() + make_interval(secs => $7::float8), now(),
                now())
        ON CONFLICT (tenant_id, entity_url) DO UPDATE SET
            active_consumer_id = EXCLUDED.active_consumer_id,
            active_runner_id = EXCLUDED.active_runner_id,
            active_epoch = EXCLUDED.active_epoch,
            active_claimed_at = EXCLUDED.active_claimed_at,
            active_lease_expires_at = EXCLUDED.active_lease_expires_at,
            last_claimed_at = EXCLUDED.last_claimed_at,
            updated_at = now()
        """,
        tenant,
        claim.consumer_id,
        claim.epoch,
        claim.entity_url,
        claim.stream_path,
        claim.runner_id,
        lease_s,
    )


async def record_claim_heartbeat(
    conn: asyncpg.Connection,
    tenant: str,
    consumer_id: str,
    epoch: int,
    lease_ttl_ms: int | None,
) -> bool:
    """A heartbeat accepted by the subscription: `last_heartbeat_at` = now, and the lease
    moved to where the subscription moved it (it renews the lease on every accepted call,
    so the health report shows the real expiry). True if an active row was updated."""
    lease_s = lease_ttl_ms / 1000 if lease_ttl_ms is not None else None
    updated = await conn.fetchval(
        """
        WITH touched AS (
            UPDATE consumer_claims SET
                last_heartbeat_at = now(),
                lease_expires_at = COALESCE(now() + make_interval(secs => $4::float8),
                                            lease_expires_at),
                updated_at = now()
            WHERE tenant_id = $1 AND consumer_id = $2 AND epoch = $3 AND status = 'active'
            RETURNING entity_url
        ), state AS (
            UPDATE entity_dispatch_state SET
                active_lease_expires_at = COALESCE(now() + make_interval(secs => $4::float8),
                                                   active_lease_expires_at),
                updated_at = now()
            WHERE tenant_id = $1 AND entity_url IN (SELECT entity_url FROM touched)
              AND active_consumer_id = $2 AND active_epoch = $3
        )
        SELECT count(*) FROM touched
        """,
        tenant,
        consumer_id,
        epoch,
        lease_s,
    )
    return bool(updated)


async def release_claim(
    conn: asyncpg.Connection,
    tenant: str,
    consumer_id: str,
    epoch: int,
    acked_streams: list[dict[str, str]],
) -> bool:
    """Mark the claim released with the streams it acknowledged, and clear the entity's
    active fields if they still point at this claim. True when they did ("entity
    cleared", spec/03 §5.13 done step 2)."""
    cleared = await conn.fetchval(
        """
        WITH released AS (
            UPDATE consumer_claims SET
                status = 'released', released_at = now(), acked_streams = $4::jsonb,
                updated_at = now()
            WHERE tenant_id = $1 AND consumer_id = $2 AND epoch = $3
            RETURNING entity_url
        ), cleared AS (
            UPDATE entity_dispatch_state SET
                active_consumer_id = NULL, active_runner_id = NULL, active_epoch = NULL,
                active_claimed_at = NULL, active_lease_expires_at = NULL,
                last_released_at = now(), last_completed_at = now(), updated_at = now()
            WHERE tenant_id = $1 AND entity_url IN (SELECT entity_url FROM released)
              AND active_consumer_id = $2 AND active_epoch = $3
            RETURNING 1
        )
        SELECT count(*) FROM cleared
        """,
        tenant,
        consumer_id,
        epoch,
        orjson.dumps(acked_streams).decode(),
    )
    return bool(cleared)

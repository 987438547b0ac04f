"""SQL for the outstanding wake of a subscription (its columns on `ds_subscriptions`) and for
the delivery outbox those columns form: when an attempt is due, who is making it."""

from __future__ import annotations

import asyncpg

from electric_agents.streams.subscription_store import (
    SUBSCRIPTION_COLUMNS,
    PendingLink,
    subscription_from_row,
)
from electric_agents.streams.subscriptions import Subscription

# Wakes -----------------------------------------------------------------------------------


async def open_wake(
    conn: asyncpg.Connection,
    subscription_id: str,
    *,
    generation: int,
    wake_id: str,
    state: str,
    link: PendingLink,
    holder: str | None,
    lease_ttl_ms: int | None,
    delivery_owner: int | None,
    delivery_lease_s: float,
) -> Subscription:
    """Record a new outstanding wake naming `link`. With `delivery_owner`, the caller holds the
    first delivery attempt; otherwise it is due now for whichever process takes it."""
    row = await conn.fetchrow(
        f"""
        UPDATE ds_subscriptions SET
            generation = $2, wake_id = $3, wake_state = $4, wake_path = $5,
            wake_link_type = $6, wake_acked_offset = $7, wake_tail_offset = $8,
            wake_holder = $9,
            lease_expires_at = now() + make_interval(secs => $10::float8 / 1000),
            next_attempt_at = CASE WHEN $4 IN ('delivering', 'notifying') THEN now() END,
            attempts = 0,
            delivery_owner = $11,
            delivery_lease_until = CASE WHEN $11::bigint IS NOT NULL
                                        THEN now() + make_interval(secs => $12) END
        WHERE id = $1
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,
        subscription_id,
        generation,
        wake_id,
        state,
        link.path,
        link.link_type,
        link.acked_offset,
        link.tail,
        holder,
        lease_ttl_ms,
        delivery_owner,
        delivery_lease_s,
    )
    await conn.execute(
        """
        UPDATE ds_subscription_links SET last_named_generation = $3
        WHERE subscription_id = $1 AND path = $2
        """,
        subscription_id,
        link.path,
        generation,
    )
    return subscription_from_row(row)


async def clear_wake(conn: asyncpg.Connection, subscription_id: str) -> None:
    """No wake outstanding, so no delivery failing either."""
    await conn.execute(
        """
        UPDATE ds_subscriptions SET
            wake_id = NULL, wake_state = NULL, wake_path = NULL, wake_link_type = NULL,
            wake_acked_offset = NULL, wake_tail_offset = NULL, wake_holder = NULL,
            lease_expires_at = NULL, next_attempt_at = NULL, attempts = 0,
            delivery_owner = NULL, delivery_lease_until = NULL,
            status = 'active', last_error = NULL
        WHERE id = $1
        """,
        subscription_id,
    )


async def claim_wake(
    conn: asyncpg.Connection, subscription_id: str, holder: str, lease_ttl_ms: int
) -> Subscription:
    """Hand the outstanding pull-wake to `holder`, naming the stream up to its tail now."""
    row = await conn.fetchrow(
        f"""
        UPDATE ds_subscriptions sub SET
            wake_state = 'claimed', wake_holder = $2,
            wake_tail_offset = greatest(wake_tail_offset, coalesce(
                (SELECT s.tail FROM ds_streams s
                 WHERE s.path = sub.wake_path AND NOT s.soft_deleted), 0)),
            lease_expires_at = now() + make_interval(secs => $3::float8 / 1000),
            next_attempt_at = NULL, delivery_owner = NULL, delivery_lease_until = NULL
        WHERE id = $1
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,
        subscription_id,
        holder,
        lease_ttl_ms,
    )
    return subscription_from_row(row)


async def extend_lease(conn: asyncpg.Connection, subscription_id: str, lease_ttl_ms: int) -> None:
    await conn.execute(
        """
        UPDATE ds_subscriptions
        SET lease_expires_at = now() + make_interval(secs => $2::float8 / 1000)
        WHERE id = $1
        """,
        subscription_id,
        lease_ttl_ms,
    )


async def expired_lease_subscriptions(conn: asyncpg.Connection, limit: int) -> list[str]:
    rows = await conn.fetch(
        """
        SELECT id FROM ds_subscriptions
        WHERE wake_state IN ('delivered', 'claimed') AND lease_expires_at <= now()
        ORDER BY lease_expires_at LIMIT $1
        """,
        limit,
    )
    return [row["id"] for row in rows]


# The delivery outbox ---------------------------------------------------------------------


async def take_due_deliveries(
    conn: asyncpg.Connection, owner: int, delivery_lease_s: float, limit: int
) -> list[Subscription]:
    """Take the delivery attempts that are due and that no live process holds. SKIP LOCKED
    lets several processes take disjoint sets; the lease keeps a taken one from being taken
    again while its attempt runs. A webhook names the stream up to its tail now."""
    rows = await conn.fetch(
        f"""
        UPDATE ds_subscriptions sub SET
            delivery_owner = $1,
            delivery_lease_until = now() + make_interval(secs => $2),
            wake_tail_offset = CASE WHEN sub.type = 'webhook' THEN greatest(
                wake_tail_offset, coalesce((SELECT s.tail FROM ds_streams s
                    WHERE s.path = sub.wake_path AND NOT s.soft_deleted), 0))
                ELSE wake_tail_offset END
        WHERE sub.id IN (
            SELECT id FROM ds_subscriptions
            WHERE wake_state IN ('delivering', 'notifying') AND next_attempt_at <= now()
              AND (delivery_lease_until IS NULL OR delivery_lease_until <= now())
            ORDER BY next_attempt_at
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,
        owner,
        delivery_lease_s,
        limit,
    )
    return [subscription_from_row(row) for row in rows]


async def record_delivered(
    conn: asyncpg.Connection, subscription_id: str, wake_id: str, lease_ttl_ms: int
) -> bool:
    """A webhook answered 2xx without `done`: the consumer now holds the wake on a lease."""
    result = await conn.execute(
        """
        UPDATE ds_subscriptions SET
            wake_state = 'delivered', status = 'active', attempts = 0, last_error = NULL,
            lease_expires_at = now() + make_interval(secs => $3::float8 / 1000),
            next_attempt_at = NULL, delivery_owner = NULL, delivery_lease_until = NULL
        WHERE id = $1 AND wake_id = $2 AND wake_state = 'delivering'
        """,
        subscription_id,
        wake_id,
        lease_ttl_ms,
    )
    return result.endswith(" 1")


async def record_notified(conn: asyncpg.Connection, subscription_id: str, wake_id: str) -> None:
    """The wake event is in the wake stream; the wake waits for a claim."""
    await conn.execute(
        """
        UPDATE ds_subscriptions SET
            wake_state = 'waiting', status = 'active', attempts = 0, last_error = NULL,
            next_attempt_at = NULL, delivery_owner = NULL, delivery_lease_until = NULL
        WHERE id = $1 AND wake_id = $2 AND wake_state = 'notifying'
        """,
        subscription_id,
        wake_id,
    )


async def record_attempt_failed(
    conn: asyncpg.Connection, subscription_id: str, wake_id: str, retry_in_s: float, error: str
) -> None:
    await conn.execute(
        """
        UPDATE ds_subscriptions SET
            status = 'failed', attempts = attempts + 1, last_error = $4,
            next_attempt_at = now() + make_interval(secs => $3),
            delivery_owner = NULL, delivery_lease_until = NULL
        WHERE id = $1 AND wake_id = $2 AND wake_state IN ('delivering', 'notifying')
        """,
        subscription_id,
        wake_id,
        retry_in_s,
        error[:1000],
    )


async def other_delivery_owners(conn: asyncpg.Connection, owner: int) -> list[int]:
    rows = await conn.fetch(
        """
        SELECT DISTINCT delivery_owner FROM ds_subscriptions
        WHERE delivery_lease_until > now() AND delivery_owner IS DISTINCT FROM $1
        """,
        owner,
    )
    return [row["delivery_owner"] for row in rows]


async def release_if_owner_gone(conn: asyncpg.Connection, owner: int) -> int:
    """Free the attempts of a process that no longer holds its liveness lock (it crashed),
    so they are retried now instead of when their lease runs out."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", owner):
            return 0
        result = await conn.execute(
            """
            UPDATE ds_subscriptions SET delivery_owner = NULL, delivery_lease_until = NULL
            WHERE delivery_owner = $1
            """,
            owner,
        )
    return int(result.rsplit(" ", 1)[-1])


async def renew_attempt(
    conn: asyncpg.Connection, subscription_id: str, wake_id: str, owner: int, lease_s: float
) -> bool:
    """Extend this process's hold on an attempt; False if it no longer holds it."""
    result = await conn.execute(
        """
        UPDATE ds_subscriptions SET delivery_lease_until = now() + make_interval(secs => $4)
        WHERE id = $1 AND wake_id = $2 AND delivery_owner = $3
          AND wake_state IN ('delivering', 'notifying')
        """,
        subscription_id,
        wake_id,
        owner,
        lease_s,
    )
    return result.endswith(" 1")


async def seconds_until_next_deadline(conn: asyncpg.Connection) -> float | None:
    """Until the earliest retry, lease expiry or attempt-lease expiry any process set."""
    value = await conn.fetchval(
        """
        SELECT extract(epoch FROM min(deadline) - now()) FROM (
            SELECT min(greatest(next_attempt_at, coalesce(delivery_lease_until, next_attempt_at)))
                AS deadline
            FROM ds_subscriptions WHERE wake_state IN ('delivering', 'notifying')
            UNION ALL
            SELECT min(lease_expires_at) FROM ds_subscriptions
            WHERE wake_state IN ('delivered', 'claimed')
        ) deadlines
        """
    )
    return float(value) if value is not None else None

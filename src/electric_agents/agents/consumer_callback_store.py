"""SQL for `consumer_callbacks` (spec/03 §1.2, §5.13): the DS callback behind each forwarded
wake: recorded when a webhook wake is forwarded or a runner claims a pull wake, read by
`callback-forward`."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# The callback recorded for a pull-wake consumer: the subscription to ack on.
PULL_WAKE_CALLBACK_PREFIX = "ds-subscription:"


@dataclass(frozen=True)
class ConsumerCallback:
    callback_url: str
    primary_stream: str | None

    @property
    def pull_wake_subscription(self) -> str | None:
        """The subscription of a pull-wake consumer; None for a webhook one."""
        if self.callback_url.startswith(PULL_WAKE_CALLBACK_PREFIX):
            return self.callback_url[len(PULL_WAKE_CALLBACK_PREFIX) :] or None
        return None


def pull_wake_callback(subscription_id: str) -> str:
    return PULL_WAKE_CALLBACK_PREFIX + subscription_id


async def upsert_consumer_callback(
    conn: asyncpg.Connection,
    tenant: str,
    consumer_id: str,
    callback_url: str,
    primary_stream: str,
) -> None:
    await conn.execute(
        """
        INSERT INTO consumer_callbacks (tenant_id, consumer_id, callback_url, primary_stream)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (tenant_id, consumer_id) DO UPDATE
        SET callback_url = EXCLUDED.callback_url, primary_stream = EXCLUDED.primary_stream
        """,
        tenant,
        consumer_id,
        callback_url,
        primary_stream,
    )


async def get_consumer_callback(
    conn: asyncpg.Connection, tenant: str, consumer_id: str
) -> ConsumerCallback | None:
    if "\x00" in consumer_id:
        return None  # PostgreSQL text cannot hold NUL, so no such consumer was stored
    row = await conn.fetchrow(
        """
        SELECT callback_url, primary_stream FROM consumer_callbacks
        WHERE tenant_id = $1 AND consumer_id = $2
        """,
        tenant,
        consumer_id,
    )
    return ConsumerCallback(row["callback_url"], row["primary_stream"]) if row else None


async def has_consumer_callback(conn: asyncpg.Connection, tenant: str, main_stream: str) -> bool:
    """Whether any wake of the entity whose main stream is `main_stream` went through the
    callback protocol (spec/03 §4.11: the run-finished shortcut is then disabled for good)."""
    # The path is matched with and without its leading slash: the reference stores the
    # entity form (`/chat/a1/main`), the stream engine names it without (`chat/a1/main`).
    bare = main_stream.lstrip("/")
    found = await conn.fetchval(
        """
        SELECT 1 FROM consumer_callbacks
        WHERE tenant_id = $1 AND primary_stream IN ($2, $3)
        LIMIT 1
        """,
        tenant,
        "/" + bare,
        bare,
    )
    return found is not None

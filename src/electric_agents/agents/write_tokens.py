"""Claim write tokens (spec/02 §4.8, spec/03 §5.13): what authorises a handler's writes to an
entity's streams and tags during a claimed wake.

Deliberate change from the reference: tokens live in Postgres (`claim_write_tokens`,
migration 0004), not in one process's memory, so every server process and a restart agree on
which token is live. Only a SHA-256 of each token is stored.

Rules kept from the reference: one live token per entity (minting replaces the previous one,
and a wake that held another entity's token loses it); the same token authorises `/main` and
`/error`; it is revoked when its wake is done and when the entity becomes terminal.
Every function takes a connection so callers can join it to their own transaction.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping

import asyncpg

_BEARER = re.compile(r"^Bearer\s+", re.IGNORECASE)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def claim_token_from_headers(headers: Mapping[str, str]) -> str | None:
    """The presented token: `electric-claim-token` (trimmed), else `authorization` with a
    leading `Bearer ` removed (case-insensitive); None when neither carries one. `headers`
    are keyed by lower-cased name."""
    token = headers.get("electric-claim-token", "").strip()
    if not token:
        token = _BEARER.sub("", headers.get("authorization", "")).strip()
    return token or None


async def mint_write_token(
    conn: asyncpg.Connection,
    tenant: str,
    entity_url: str,
    wake_id: str,
    *,
    ttl_s: float | None = None,
) -> str:
    """A fresh token for `entity_url` (the entity URL, e.g. `/chat/a1`, not a stream path)
    held by `wake_id`. Replaces the entity's previous token and any token `wake_id` held for
    another entity. `ttl_s` bounds its life; None keeps it until revoked (the reference)."""
    token = str(uuid.uuid4())  # the reference's format: a random UUID v4
    await conn.execute(
        """
        WITH evicted AS (
            DELETE FROM claim_write_tokens
            WHERE tenant_id = $1 AND wake_id = $4 AND entity_url <> $2
        )
        INSERT INTO claim_write_tokens (tenant_id, entity_url, token_hash, wake_id, expires_at)
        VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))
        ON CONFLICT (tenant_id, entity_url) DO UPDATE
        SET token_hash = EXCLUDED.token_hash, wake_id = EXCLUDED.wake_id,
            created_at = now(), expires_at = EXCLUDED.expires_at
        """,
        tenant,
        entity_url,
        _digest(token),
        wake_id,
        ttl_s,
    )
    return token


async def check_write_token(
    conn: asyncpg.Connection, tenant: str, entity_url: str, token: str | None
) -> bool:
    """Whether `token` is the live write token of `entity_url` (the entity URL)."""
    if not token:
        return False
    found = await conn.fetchval(
        """
        SELECT 1 FROM claim_write_tokens
        WHERE tenant_id = $1 AND entity_url = $2 AND token_hash = $3
          AND (expires_at IS NULL OR expires_at > now())
        """,
        tenant,
        entity_url,
        _digest(token),
    )
    return found is not None


async def wake_owns_write_token(
    conn: asyncpg.Connection, tenant: str, entity_url: str, wake_id: str
) -> bool:
    """Whether the entity's live token is still the one minted for `wake_id` (a newer claim
    may have replaced it); the done handling asks this before it touches the status."""
    found = await conn.fetchval(
        """
        SELECT 1 FROM claim_write_tokens
        WHERE tenant_id = $1 AND entity_url = $2 AND wake_id = $3
          AND (expires_at IS NULL OR expires_at > now())
        """,
        tenant,
        entity_url,
        wake_id,
    )
    return found is not None


async def revoke_write_token(
    conn: asyncpg.Connection, tenant: str, entity_url: str, *, wake_id: str | None = None
) -> bool:
    """Revoke the entity's token; with `wake_id`, only if that wake still holds it (a done
    callback must not revoke a newer wake's token). True if a token was revoked."""
    revoked = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM claim_write_tokens
            WHERE tenant_id = $1 AND entity_url = $2 AND ($3::text IS NULL OR wake_id = $3)
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        tenant,
        entity_url,
        wake_id,
    )
    return bool(revoked)

"""The wake state machine of one subscription (spec/01 §A.19).

Every function runs inside a transaction that holds the subscription's row lock, so each
transition happens once however many server processes share the database.

A subscription has at most one outstanding wake. A wake names ONE pending stream, up to the
offset it names (`tail_offset`). An acknowledgement through that wake, explicit or by
`{"done":true}`, covers that stream up to that offset and never more. (The reference named
every linked stream, and a `done` from a handler that had seen one of them acknowledged all
of them, so most streams under a shared pattern subscription never reached a handler.) When
a wake ends and work remains, the next wake names the pending stream named longest ago.

    state       entered when                      left when
    (none)      created; a wake ended             a linked stream has pending data -> open
    delivering  webhook wake opened               2xx {"done":true} -> finish, snapshot acked
                                                  other 2xx -> delivered; failure -> retry later
    delivered   webhook answered 2xx              callback done -> finish; lease expiry -> finish
    notifying   pull-wake wake opened             wake event appended -> waiting
    waiting     wake event appended               claim -> claimed
    claimed     claim                             ack done / release / lease expiry -> finish
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from electric_agents.errors import ApiError
from electric_agents.streams import subscription_store as store
from electric_agents.streams import wake_store
from electric_agents.streams.offsets import parse_offset
from electric_agents.streams.signing import TokenClaims
from electric_agents.streams.subscriptions import Subscription, Wake, normalize_path


class AlreadyClaimed(ApiError):
    """409 ALREADY_CLAIMED, naming the current holder and generation beside the code."""

    def __init__(self, holder: str | None, generation: int) -> None:
        super().__init__(409, "ALREADY_CLAIMED", "Wake is already claimed")
        self.holder = holder
        self.generation = generation

    def envelope(self) -> dict[str, Any]:
        body = super().envelope()
        body["error"]["current_holder"] = self.holder
        body["error"]["generation"] = self.generation
        return body


def fenced() -> ApiError:
    return ApiError(409, "FENCED", "Wake generation is stale")


def invalid_offset(message: str) -> ApiError:
    return ApiError(409, "INVALID_OFFSET", message)


@dataclass(frozen=True)
class DeliveryLease:
    """Who makes the first delivery attempt of a wake opened now: this process (it starts
    the attempt right after commit) for `seconds`. None leaves the attempt to any process."""

    owner: int
    seconds: float


@dataclass(frozen=True)
class Ack:
    stream: str
    offset: str


def new_wake_id() -> str:
    return "w_" + secrets.token_hex(12)


async def open_next_wake(
    conn: asyncpg.Connection, subscription: Subscription, lease: DeliveryLease | None
) -> Subscription | None:
    """Open a wake for the next pending stream; None if a wake is outstanding or none is
    pending."""
    if subscription.wake is not None:
        return None
    link = await store.next_pending_link(conn, subscription.id)
    if link is None:
        return None
    return await wake_store.open_wake(
        conn,
        subscription.id,
        generation=subscription.generation + 1,
        wake_id=new_wake_id(),
        state="delivering" if subscription.type == "webhook" else "notifying",
        link=link,
        holder=None,
        lease_ttl_ms=None,
        delivery_owner=lease.owner if lease else None,
        delivery_lease_s=lease.seconds if lease else 0.0,
    )


async def finish_wake(
    conn: asyncpg.Connection,
    subscription: Subscription,
    lease: DeliveryLease | None,
    *,
    ack_named_offset: int | None = None,
) -> Subscription | None:
    """End the outstanding wake, acknowledging its stream up to `ack_named_offset` if given,
    and open the next wake if work remains (returned, so the caller can deliver it)."""
    wake = subscription.wake
    if wake is None:
        return None
    if ack_named_offset is not None:
        await store.acknowledge(
            conn, subscription.id, wake.path, min(ack_named_offset, wake.tail_offset)
        )
    await wake_store.clear_wake(conn, subscription.id)
    return await open_next_wake(conn, replace(subscription, wake=None), lease)


async def claim(conn: asyncpg.Connection, subscription: Subscription, worker: str) -> Subscription:
    """A pull-wake worker takes the outstanding wake, or a new one if work is pending and the
    wake event has not been written yet (a worker may claim before it sees the event)."""
    wake = subscription.wake
    if wake is not None and wake.state == "claimed":
        if not wake.lease_expired:
            raise AlreadyClaimed(wake.holder, wake.generation)
        # The holder's lease ran out before the sweeper noticed: it lost the wake.
        await wake_store.clear_wake(conn, subscription.id)
        subscription, wake = replace(subscription, wake=None), None
    if wake is not None:
        return await wake_store.claim_wake(conn, subscription.id, worker, subscription.lease_ttl_ms)
    link = await store.next_pending_link(conn, subscription.id)
    if link is None:
        raise ApiError(409, "NO_PENDING_WORK", "Subscription has no pending work")
    return await wake_store.open_wake(
        conn,
        subscription.id,
        generation=subscription.generation + 1,
        wake_id=new_wake_id(),
        state="claimed",
        link=link,
        holder=worker,
        lease_ttl_ms=subscription.lease_ttl_ms,
        delivery_owner=None,
        delivery_lease_s=0.0,
    )


def check_fence(
    subscription: Subscription,
    claims: TokenClaims,
    wake_id: str | None,
    generation: int | None,
) -> Wake:
    """The token, and the body's wake id and generation when given, must name the current
    wake, and its lease must still run: anything else is a stale consumer."""
    wake = subscription.wake
    if (
        wake is None
        or claims.wake_id != wake.wake_id
        or claims.generation != wake.generation
        or (wake_id is not None and wake_id != wake.wake_id)
        or (generation is not None and generation != wake.generation)
        or (wake.state in ("delivered", "claimed") and wake.lease_expired)
    ):
        raise fenced()
    return wake


async def apply_acks(
    conn: asyncpg.Connection, subscription: Subscription, wake: Wake, acks: list[Ack]
) -> None:
    """Acks are inclusive ("processed up to N"). All are checked before any is applied.

    An ack must name a linked stream, not be -1, not go back, and not pass the stream's
    tail (409 INVALID_OFFSET, as the reference). It then moves the stream named by this wake
    at most to the offset the wake named; acks of other linked streams change nothing, since
    this wake never delivered them.
    """
    if not acks:
        return
    paths = [normalize_path(ack.stream) for ack in acks]
    offsets = await store.link_offsets(conn, subscription.id, paths)
    named_offset: int | None = None
    for ack, path in zip(acks, paths, strict=True):
        if path not in offsets:
            raise invalid_offset("Ack references an unknown subscription stream")
        if ack.offset == "-1":
            raise invalid_offset("Ack offset must not be -1")
        position = parse_offset(ack.offset)
        if position is None:
            raise invalid_offset("Ack offset is malformed")
        acked, tail = offsets[path]
        if position < acked:
            raise invalid_offset("Ack offset regresses the committed cursor")
        if position > (tail or 0):
            raise invalid_offset("Ack offset is beyond stream tail")
        if path == wake.path:
            named_offset = max(named_offset or 0, min(position, wake.tail_offset))
    if named_offset is not None:
        await store.acknowledge(conn, subscription.id, wake.path, named_offset)


async def expire_lease(
    conn: asyncpg.Connection, subscription: Subscription, lease: DeliveryLease | None
) -> tuple[bool, Subscription | None]:
    """(whether the outstanding wake's lease had run out and it ended, the next wake)."""
    wake = subscription.wake
    if wake is None or wake.state not in ("delivered", "claimed") or not wake.lease_expired:
        return False, None
    return True, await finish_wake(conn, subscription, lease)

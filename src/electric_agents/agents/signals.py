"""The entity lifecycle: signals (spec/03 §2.4) and what the dispatch layer reports when a
wake starts and when it ends (spec/03 §2.3 T5-T12). Everything that changes an entity's
status outside spawn and sends is decided here, from the tables below.

Each change commits in ONE transaction: the status row, the `signal` event, the stream
closes, the wake-registration deletes and the write-token revocation, so a crash never
leaves a `killed` entity with open streams (the reference committed the status first and
appended afterwards, spec/03 §6.5).

Two reference bugs are fixed here, not copied:
* spec/03 §2.7: `stopping -> stopped` at the end of a wake ran only the status write. Here it
  runs the same terminal cleanup as a terminal signal (streams closed, wakes removed, write
  token revoked).
* spec/03 §2.8.1/2: the end of a wake wrote `idle` over `paused` (SIGSTOP on a running entity
  was undone), and a wake starting while `stopping` wrote `running` (the stop was lost). Here
  `paused` and `stopping` survive both.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from electric_agents.agents.dispatch_links import unlink_dispatch
from electric_agents.agents.entity_store import (
    TERMINAL_STATUSES,
    Entity,
    get_entity,
    set_status,
)
from electric_agents.agents.events import JSON_CONTENT_TYPE, iso_from_datetime, stream_path
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.wake_registration_store import delete_entity_wake_registrations
from electric_agents.agents.wakes import evaluate_wakes
from electric_agents.agents.write_tokens import revoke_write_token, wake_owns_write_token
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction

log = logging.getLogger(__name__)

ENTITY_SIGNALS = ("SIGINT", "SIGHUP", "SIGTERM", "SIGKILL", "SIGSTOP", "SIGCONT", "SIGUSR")
SERVER_SIGNAL_SENDER = "/_electric/server"
# Errors of an append-and-close that mean "already closed / already gone": closing is
# idempotent (spec/03 §2.4.2 step 5).
_ALREADY_CLOSED_CODES = frozenset({"STREAM_CLOSED", "STREAM_NOT_FOUND", "STREAM_GONE"})


@dataclass(frozen=True)
class Handling:
    """What the server does with one signal in one status."""

    new_status: str
    # Handled signals are final; unhandled ones are left for the runtime (spec/03 §2.4.3).
    handled: bool
    # Recorded in the event only when handled: "transitioned" or "ignored".
    outcome: str | None = None

    @property
    def terminal(self) -> bool:
        return self.new_status in TERMINAL_STATUSES


def _h(new_status: str, outcome: str = "transitioned") -> Handling:
    return Handling(new_status, handled=True, outcome=outcome)


def _u(new_status: str) -> Handling:
    return Handling(new_status, handled=False)


def _row(*cells: Handling) -> dict[str, Handling]:
    return dict(zip(ENTITY_SIGNALS, cells, strict=True))


_IGNORED = "ignored"

# spec/03 §2.4.1, every (status, signal) pair. H = handled by the server, U = left to the
# runtime. Terminal statuses have no row: signalling them is 409 INVALID_SIGNAL.
SIGNAL_TABLE: dict[str, dict[str, Handling]] = {
    # status      SIGINT                   SIGHUP                   SIGTERM          SIGKILL
    #             SIGSTOP                  SIGCONT                  SIGUSR
    "spawning": _row(
                  _u("spawning"),          _u("spawning"),          _u("spawning"),  _h("killed"),
                  _u("spawning"),          _u("spawning"),          _u("spawning"),
    ),
    "idle": _row(
                  _u("idle"),              _u("idle"),              _h("stopped"),   _h("killed"),
                  _h("paused"),            _u("idle"),              _u("idle"),
    ),
    # SIGTERM while running waits for the wake to end (`stopping`); SIGSTOP pauses at once
    # but is unhandled so the runtime stops after its checkpoint.
    "running": _row(
                  _u("running"),           _u("running"),           _u("stopping"),  _h("killed"),
                  _u("paused"),            _u("running"),           _u("running"),
    ),
    # A paused entity is never dispatched, so signals it ignores are marked handled here,
    # or they would wait forever; SIGCONT is left unhandled so the runtime resumes its queue.
    "paused": _row(
                  _h("paused", _IGNORED),  _h("paused", _IGNORED),  _h("stopped"),   _h("killed"),
                  _h("paused", _IGNORED),  _u("idle"),              _h("paused", _IGNORED),
    ),
    "stopping": _row(
                  _u("stopping"),          _u("stopping"),          _u("stopping"),  _h("killed"),
                  _u("stopping"),          _u("stopping"),          _u("stopping"),
    ),
}  # fmt: skip

# What a wake starting does to the status (T5/T8), and whether it may be dispatched at all.
# `stopping` stays `stopping` (fix of §2.8.2); paused and terminal entities are not woken
# (the reference still forwarded wakes to killed entities, §2.8.3).
WAKE_START_TABLE: dict[str, str | None] = {
    "spawning": "running",
    "idle": "running",
    "running": "running",
    "stopping": "stopping",
    "paused": None,
    "stopped": None,
    "killed": None,
}

# What the end of a wake does to the status (T9-T12). `paused` survives (fix of §2.8.1);
# `stopping` becomes `stopped` with the full terminal cleanup (fix of §2.7).
RUN_FINISHED_TABLE: dict[str, str] = {
    "spawning": "idle",
    "idle": "idle",
    "running": "idle",
    "paused": "paused",
    "stopping": "stopped",
    "stopped": "stopped",
    "killed": "killed",
}


def handling_for(status: str, signal: str) -> Handling:
    """The server's handling of `signal` for an entity in `status` (spec/03 §2.4.1)."""
    if signal not in ENTITY_SIGNALS:
        raise ApiError(400, "INVALID_REQUEST", f'Invalid entity signal: "{signal}"')
    if status in TERMINAL_STATUSES:
        raise ApiError(409, "INVALID_SIGNAL", f"Cannot signal a {status} entity")
    return SIGNAL_TABLE[status][signal]


# --- signals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalResult:
    url: str
    signal: str
    previous_state: str
    new_state: str
    created_at: int
    txid: int
    # The event as written to the main stream (and the error stream when terminal).
    event: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """The SignalResponse of spec/02 §3.0, in the reference's key order."""
        return {
            "url": self.url,
            "signal": self.signal,
            "previous_state": self.previous_state,
            "new_state": self.new_state,
            "created_at": self.created_at,
            "txid": self.txid,
        }


# Marks "no payload given": a JSON null payload is kept in the event, an absent one is not.
NO_PAYLOAD: Any = object()


async def send_signal(
    runtime: AgentsRuntime,
    entity_url: str,
    signal: str,
    *,
    reason: str | None = None,
    payload: Any = NO_PAYLOAD,
) -> SignalResult:
    """Apply `signal` to the entity (spec/03 §2.4.2): status, `signal` event and, for a
    terminal result, both streams closed, wake registrations removed and the write token
    revoked, all in one transaction. `payload` may be any JSON value including None; leave
    it out for none."""
    if signal not in ENTITY_SIGNALS:
        raise ApiError(400, "INVALID_REQUEST", f'Invalid entity signal: "{signal}"')
    tenant = runtime.tenant_id
    now = datetime.now(UTC)
    async with runtime.engine.transaction() as tx:
        # The row lock serialises signals, wake starts and wake ends for one entity.
        entity = await get_entity(tx.conn, tenant, entity_url, for_update=True)
        if entity is None:
            raise ApiError(404, "NOT_FOUND", "Entity not found")
        previous = entity.status
        handling = handling_for(previous, signal)
        # An unchanged status is still written: it bumps updated_at and gives the txid
        # clients wait for (the reference's touchEntityWithTxid).
        txid = await set_status(tx.conn, tenant, entity_url, handling.new_status)
        event = signal_event(
            signal, handling, previous, txid=txid, now=now, reason=reason, payload=payload
        )
        body = orjson.dumps(event)
        if handling.terminal:
            await enter_terminal(tx, tenant, entity, closing_body=body)
        else:
            await tx.append(
                stream_path(entity.main_stream),
                content_type=JSON_CONTENT_TYPE,
                body=body,
            )
            # A non-terminal signal is a change on the entity as a wake source (spec/03
            # §2.4.2 step 6), evaluated in the signal's transaction.
            await evaluate_wakes(tx, tenant, entity_url, [event])
    log.info(
        "signal %s on %s: %s -> %s (%s)",
        signal,
        entity_url,
        previous,
        handling.new_status,
        "handled" if handling.handled else "unhandled",
    )
    return SignalResult(
        url=entity_url,
        signal=signal,
        previous_state=previous,
        new_state=handling.new_status,
        created_at=int(now.timestamp() * 1000),
        txid=txid,
        event=event,
    )


def signal_event(
    signal: str,
    handling: Handling,
    previous_state: str,
    *,
    txid: int,
    now: datetime,
    reason: str | None = None,
    payload: Any = NO_PAYLOAD,
) -> dict[str, Any]:
    """The `signal` change event of spec/03 §3.5.4, in the reference's key order."""
    timestamp = iso_from_datetime(now)
    value: dict[str, Any] = {
        "signal": signal,
        "status": "handled" if handling.handled else "unhandled",
        "sender": SERVER_SIGNAL_SENDER,
        "timestamp": timestamp,
    }
    if reason is not None:
        value["reason"] = reason
    if payload is not NO_PAYLOAD:
        value["payload"] = payload
    if handling.handled:
        value["handled_at"] = timestamp
        value["handled_by"] = SERVER_SIGNAL_SENDER
        value["outcome"] = handling.outcome
        value["previous_state"] = previous_state
        value["new_state"] = handling.new_status
    return {
        "type": "signal",
        "key": f"sig-{int(now.timestamp() * 1000)}-{uuid.uuid4().hex[:8]}",
        "value": value,
        "headers": {"operation": "insert", "timestamp": timestamp, "txid": str(txid)},
    }


# --- terminal entry -----------------------------------------------------------------------


async def enter_terminal(
    tx: StreamTransaction, tenant: str, entity: Entity, *, closing_body: bytes | None
) -> None:
    """The cleanup every terminal entry runs inside the caller's transaction (spec/03 §2.6):
    close `main` then `error` (appending `closing_body` to both first, when given), delete
    the entity's wake registrations as subscriber and as source, unlink its main stream
    from its dispatch subscription (spec/02 §3.4), revoke its write token.

    The status row must already say `stopped`/`killed` in this transaction. A wake already
    queued for the entity is refused at start (WAKE_START_TABLE)."""
    for stream in (entity.main_stream, entity.error_stream):
        try:
            await tx.append(
                stream_path(stream),
                content_type=JSON_CONTENT_TYPE if closing_body else None,
                body=closing_body or b"",
                close=True,
            )
        except ApiError as error:
            if error.code not in _ALREADY_CLOSED_CODES:
                raise
            log.warning("closing %s for terminal %s: %s", stream, entity.url, error.message)
    removed = await delete_entity_wake_registrations(tx.conn, tenant, entity.url)
    await unlink_dispatch(tx.conn, entity)
    await revoke_write_token(tx.conn, tenant, entity.url)
    if removed:
        log.info("removed %d wake registrations of terminal %s", removed, entity.url)


# --- wake start and end (called by the dispatch layer) --------------------------------------


@dataclass(frozen=True)
class LifecycleChange:
    """The status an entity had and has after a lifecycle step; `txid` is None when
    nothing was written."""

    url: str
    previous_state: str | None
    new_state: str | None
    txid: int | None = None

    @property
    def changed(self) -> bool:
        return self.txid is not None


async def on_wake_started(runtime: AgentsRuntime, entity_url: str) -> LifecycleChange | None:
    """Call when a wake for the entity is about to be handed to its handler (webhook
    forward, runner claim; spec/03 T5/T8). Returns None when the wake must NOT be
    dispatched (the entity is missing, paused or terminal; the caller answers DS
    `{"done":true}`), else the change: `running`, except that `stopping` stays `stopping`
    so the stop requested by SIGTERM is not lost (fix of spec/03 §2.8.2)."""
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        entity = await get_entity(tx.conn, tenant, entity_url, for_update=True)
        if entity is None:
            return None
        target = WAKE_START_TABLE[entity.status]
        if target is None:
            log.info("not waking %s: it is %s", entity_url, entity.status)
            return None
        txid = None
        if target != entity.status:
            txid = await set_status(tx.conn, tenant, entity_url, target)
    return LifecycleChange(entity_url, entity.status, target, txid)


async def on_run_finished(
    runtime: AgentsRuntime,
    entity_url: str,
    *,
    wake_id: str | None = None,
    release_claim: Callable[[asyncpg.Connection], Awaitable[bool]] | None = None,
) -> LifecycleChange:
    """Call when the entity's wake is over: a done callback (T9/T10), the run-finished
    shortcut of an unclaimed handler (spec/03 §4.11, T11/T12), or a delivery that failed
    outright (T6: nothing is running any more either).

    `running` becomes `idle`; `paused` stays `paused` (a SIGSTOP during the wake survives
    it, fix of spec/03 §2.8.1); `stopping` becomes `stopped` with the full terminal cleanup
    of `enter_terminal` (fix of spec/03 §2.7). With `wake_id`, that wake's write token is
    revoked if it still holds it (a newer claim's token is left alone). One transaction.

    `release_claim` (runner claims) releases the wake's durable claim under the entity's
    lock and says whether the entity's dispatch state still pointed at it; when it did not
    and the wake no longer holds the write token, a newer wake owns the entity and its
    status is left alone (spec/03 §5.13 done step 3)."""
    tenant = runtime.tenant_id
    async with runtime.engine.transaction() as tx:
        entity = await get_entity(tx.conn, tenant, entity_url, for_update=True)
        if entity is None:
            return LifecycleChange(entity_url, None, None)
        if release_claim is not None:
            cleared = await release_claim(tx.conn)
            owns = wake_id is not None and await wake_owns_write_token(
                tx.conn, tenant, entity_url, wake_id
            )
            if not (cleared or owns):
                return LifecycleChange(entity_url, entity.status, entity.status)
        if wake_id is not None:
            await revoke_write_token(tx.conn, tenant, entity_url, wake_id=wake_id)
        target = RUN_FINISHED_TABLE[entity.status]
        if target == entity.status:
            return LifecycleChange(entity_url, entity.status, target)
        txid = await set_status(tx.conn, tenant, entity_url, target)
        if target in TERMINAL_STATUSES:
            # No server event: the runtime recorded its handling of SIGTERM itself
            # (spec/03 §2.7), so the streams are only closed.
            await enter_terminal(tx, tenant, entity, closing_body=None)
    log.info("wake of %s finished: %s -> %s", entity_url, entity.status, target)
    return LifecycleChange(entity_url, entity.status, target, txid)

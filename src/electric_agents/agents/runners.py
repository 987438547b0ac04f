"""Runners, the pull-wake workers (spec/02 §3.5, spec/03 §5.14): registration, ownership,
heartbeats with client diagnostics, admin status and the health report.

Principals own runners; every operation is allowed to the owner only. The claim route
(spec/02 §3.5 claim, §4.9) belongs to wake dispatch: agents/runner_claims.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from electric_agents.agents import events, runner_store
from electric_agents.agents.principals import Principal, parse_principal
from electric_agents.agents.runner_store import Runner, RunnerDiagnostics
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.errors import ApiError, bad_request
from electric_agents.streams import subscription_store
from electric_agents.streams.lifecycle import CreateSpec

RUNNER_KINDS = ("local", "cloud-worker", "sandbox", "ci", "server")
ADMIN_STATUSES = ("enabled", "disabled")
DEFAULT_LEASE_MS = 30_000
# The stream layer's limit on a path (a longer one cannot be announced to listeners).
MAX_WAKE_STREAM_PATH_BYTES = 1024
# More client reconnects than this make a runner `degraded` (spec/02 §3.5 health).
RECONNECT_WARNING_THRESHOLD = 5

_CLIENT_STATUSES = ("stopped", "starting", "connecting", "streaming", "reconnecting", "stopping")
_CLAIM_RESULTS = ("claimed", "no_work", "error")
_DIAGNOSTIC_BOOLEANS = ("stream_connected", "last_heartbeat_ok")
_DIAGNOSTIC_TIMESTAMPS = (
    "started_at",
    "stream_connected_since",
    "last_error",
    "last_error_at",
    "last_heartbeat_at",
    "last_claim_at",
    "last_dispatch_at",
)
_DIAGNOSTIC_COUNTERS = (
    "reconnect_count",
    "events_received",
    "claims_succeeded",
    "claims_skipped",
    "claims_failed",
)


def iso(moment: datetime) -> str:
    """JavaScript's `toISOString()`: UTC, milliseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public_runner(runner: Runner) -> dict[str, Any]:
    """The Runner shape (spec/02 §3.0), in the reference's key order."""
    return {
        "id": runner.id,
        "owner_principal": runner.owner_principal,
        "label": runner.label,
        "kind": runner.kind,
        "admin_status": runner.admin_status,
        "wake_stream": runner.wake_stream,
        "created_at": iso(runner.created_at),
        "updated_at": iso(runner.updated_at),
    }


def default_wake_stream(runner_id: str) -> str:
    return f"/runners/{runner_id}/wake"


def _check_storable(field: str, value: str | None) -> None:
    # PostgreSQL text and jsonb cannot hold NUL; refuse it here rather than fail in the store.
    if value is not None and "\x00" in value:
        raise bad_request(f"{field} must not contain NUL characters")


# --- ownership ------------------------------------------------------------------------------


def canonical_owner(value: str) -> str:
    """A principal URL (`/principal/<one segment>`, the legacy unencoded form included) in
    canonical form; 400 for anything else, a bare `kind:id` key too."""
    principal = parse_principal(value) if value.startswith("/principal/") else None
    if principal is None:
        raise bad_request(
            "owner_principal must be a valid principal URL (e.g. /principal/user%3Aalice), "
            f"got: {value}"
        )
    return principal.url


def _check_requested_owner(value: str | None, caller: Principal) -> str:
    owner = caller.url if value is None else canonical_owner(value)
    if owner != caller.url:
        raise ApiError(
            403, "UNAUTHORIZED", "owner_principal must match the authenticated principal"
        )
    return owner


def runner_not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "Runner not found")


def not_owner() -> ApiError:
    return ApiError(403, "UNAUTHORIZED", "Runner access requires the authenticated owner")


async def require_owned_runner(
    conn: asyncpg.Connection, runtime: AgentsRuntime, caller: Principal, runner_id: str
) -> Runner:
    # An id with a NUL cannot have been stored, and cannot be looked up either.
    runner = None
    if "\x00" not in runner_id:
        runner = await runner_store.get_runner(conn, runtime.tenant_id, runner_id)
    if runner is None:
        raise runner_not_found()
    if runner.owner_principal != caller.url:
        raise not_owner()
    return runner


# --- registration ---------------------------------------------------------------------------


@dataclass
class RunnerRegistration:
    id: str
    label: str
    owner_principal: str | None = None
    kind: str = "local"
    admin_status: str = "enabled"
    wake_stream: str | None = None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> RunnerRegistration:
        """From a body already checked against the route's schema."""
        return cls(
            id=document["id"],
            label=document["label"],
            owner_principal=document.get("owner_principal"),
            kind=document.get("kind", "local"),
            admin_status=document.get("admin_status", "enabled"),
            wake_stream=document.get("wake_stream"),
        )


async def register_runner(
    runtime: AgentsRuntime, caller: Principal, registration: RunnerRegistration
) -> Runner:
    """Upsert the runner and ensure its wake stream, in one transaction (spec/03 §5.14)."""
    _check_storable("id", registration.id)
    _check_storable("label", registration.label)
    _check_storable("wake_stream", registration.wake_stream)
    owner = _check_requested_owner(registration.owner_principal, caller)
    wake_stream = registration.wake_stream or default_wake_stream(registration.id)
    stream_path = events.stream_path(wake_stream)
    if not stream_path:
        raise bad_request(f"wake_stream must name a stream, got: {wake_stream}")
    if len(stream_path.encode()) > MAX_WAKE_STREAM_PATH_BYTES:
        raise bad_request(f"wake_stream is limited to {MAX_WAKE_STREAM_PATH_BYTES} bytes")
    try:
        async with runtime.engine.transaction() as tx:
            previous = await runner_store.get_runner(tx.conn, runtime.tenant_id, registration.id)
            runner = await runner_store.upsert_runner(
                tx.conn,
                runtime.tenant_id,
                runner_id=registration.id,
                owner_principal=owner,
                label=registration.label,
                kind=registration.kind,
                admin_status=registration.admin_status,
                wake_stream=wake_stream,
            )
            if runner is None:
                raise not_owner()
            await tx.create(CreateSpec(stream_path, events.JSON_CONTENT_TYPE))
            if previous is not None and previous.wake_stream != wake_stream:
                # The runner now reads another stream: its dispatch subscriptions follow
                # it (the reference kept writing wake events to the old one).
                await subscription_store.move_wake_stream(
                    tx.conn, events.stream_path(previous.wake_stream), stream_path
                )
    except asyncpg.UniqueViolationError as error:
        # The reference let this constraint surface as a 500; it is the caller's input.
        if error.constraint_name != "uq_runners_wake_stream":
            raise
        raise bad_request(
            f'wake_stream "{wake_stream}" is already used by another runner'
        ) from None
    return runner


async def list_runners(
    runtime: AgentsRuntime, caller: Principal, owner_filter: str | None
) -> list[Runner]:
    """Always the caller's own runners, newest first; a filter naming anyone else is a 403."""
    owner = _check_requested_owner(owner_filter, caller)
    async with runtime.pool.acquire() as conn:
        return await runner_store.list_runners(conn, runtime.tenant_id, owner)


async def get_runner(runtime: AgentsRuntime, caller: Principal, runner_id: str) -> Runner:
    async with runtime.pool.acquire() as conn:
        return await require_owned_runner(conn, runtime, caller, runner_id)


async def set_admin_status(
    runtime: AgentsRuntime, caller: Principal, runner_id: str, admin_status: str
) -> Runner:
    async with runtime.pool.acquire() as conn, conn.transaction():
        await require_owned_runner(conn, runtime, caller, runner_id)
        runner = await runner_store.set_admin_status(
            conn, runtime.tenant_id, runner_id, admin_status
        )
    if runner is None:
        raise runner_not_found()
    return runner


# --- heartbeats -----------------------------------------------------------------------------


@dataclass
class Heartbeat:
    lease_ms: float | None = None
    wake_stream_offset: str | None = None
    liveness_lease_expires_at: str | None = None
    diagnostics: dict[str, Any] | None = None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Heartbeat:
        offset = document.get("wake_stream_offset")
        return cls(
            lease_ms=document.get("lease_ms"),
            wake_stream_offset=offset if offset is not None else document.get("wakeStreamOffset"),
            liveness_lease_expires_at=document.get("liveness_lease_expires_at"),
            diagnostics=document.get("diagnostics"),
        )


def sanitize_diagnostics(raw: Any) -> dict[str, Any] | None:
    """The whitelisted client diagnostics (spec/02 §3.5 heartbeat); None when none survive."""
    if not isinstance(raw, dict):
        return None
    clean: dict[str, Any] = {}
    if raw.get("status") in _CLIENT_STATUSES:
        clean["status"] = raw["status"]
    for key in _DIAGNOSTIC_BOOLEANS:
        if isinstance(raw.get(key), bool):
            clean[key] = raw[key]
    if "last_claim_result" in raw and (
        raw["last_claim_result"] is None or raw["last_claim_result"] in _CLAIM_RESULTS
    ):
        clean["last_claim_result"] = raw["last_claim_result"]
    for key in _DIAGNOSTIC_TIMESTAMPS:
        value = raw.get(key)
        # A NUL cannot be stored in jsonb, so such a string is dropped like any invalid value.
        if key in raw and (value is None or (isinstance(value, str) and "\x00" not in value)):
            clean[key] = value
    for key in _DIAGNOSTIC_COUNTERS:
        value = raw.get(key)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and math.isfinite(value) and value >= 0:
            clean[key] = value
    return clean or None


def _lease_expiry(heartbeat: Heartbeat, now: datetime) -> datetime:
    if heartbeat.liveness_lease_expires_at is not None:
        text = heartbeat.liveness_lease_expires_at
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            # Shifting to UTC can leave Python's year range (years 1 to 9999).
            return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
        except (ValueError, OverflowError):
            raise bad_request(
                f"liveness_lease_expires_at must be an ISO-8601 timestamp, got: {text}"
            ) from None
    lease_ms = DEFAULT_LEASE_MS if heartbeat.lease_ms is None else heartbeat.lease_ms
    try:
        return now + timedelta(milliseconds=lease_ms)
    except OverflowError:
        raise bad_request(f"lease_ms is out of range: {lease_ms}") from None


async def record_heartbeat(
    runtime: AgentsRuntime, caller: Principal, runner_id: str, heartbeat: Heartbeat
) -> dict[str, Any]:
    """Extend the runner's liveness lease; the Runner plus its liveness fields."""
    _check_storable("wake_stream_offset", heartbeat.wake_stream_offset)
    now = datetime.now(UTC)
    lease_expires_at = _lease_expiry(heartbeat, now)
    diagnostics = sanitize_diagnostics(heartbeat.diagnostics)
    async with runtime.pool.acquire() as conn:
        runner = await require_owned_runner(conn, runtime, caller, runner_id)
        await runner_store.upsert_diagnostics(
            conn,
            runtime.tenant_id,
            runner,
            last_seen_at=now,
            lease_expires_at=lease_expires_at,
            wake_stream_offset=heartbeat.wake_stream_offset,
            diagnostics=diagnostics,
        )
    out = public_runner(runner)
    out["last_seen_at"] = iso(now)
    out["liveness_lease_expires_at"] = iso(lease_expires_at)
    if heartbeat.wake_stream_offset is not None:
        out["wake_stream_offset"] = heartbeat.wake_stream_offset
    if diagnostics is not None:
        out["diagnostics"] = diagnostics
    return out


# --- health ---------------------------------------------------------------------------------

_SEVERITY = {"healthy": 0, "degraded": 1, "unhealthy": 2}


def liveness_status(runner: Runner, heartbeat: RunnerDiagnostics | None, now: datetime) -> str:
    if runner.admin_status == "disabled" or heartbeat is None:
        return "offline"
    return "online" if heartbeat.liveness_lease_expires_at > now else "expired"


def health_issues(
    runner: Runner, heartbeat: RunnerDiagnostics | None, liveness: str, now: datetime
) -> tuple[str, list[str]]:
    """The health status and its issues, checked in the spec's order (spec/02 §3.5)."""
    status = "healthy"
    issues: list[str] = []

    def flag(severity: str, issue: str) -> None:
        nonlocal status
        issues.append(issue)
        if _SEVERITY[severity] > _SEVERITY[status]:
            status = severity

    if runner.admin_status == "disabled":
        flag("unhealthy", "Runner is disabled")
    if liveness == "expired" and heartbeat is not None:
        seconds = (now - heartbeat.liveness_lease_expires_at).total_seconds()
        flag("unhealthy", f"Heartbeat lease expired {_js_round(seconds)}s ago")
    if liveness == "offline" and runner.admin_status == "enabled":
        flag("degraded", "Runner has never sent a heartbeat")
    client = heartbeat.diagnostics if heartbeat is not None else None
    if client:
        if client.get("stream_connected") is False:
            flag("degraded", "Client reports stream disconnected")
        if client.get("last_heartbeat_ok") is False:
            flag("degraded", "Client reports last heartbeat failed")
        reconnects = client.get("reconnect_count")
        if isinstance(reconnects, int | float) and reconnects > RECONNECT_WARNING_THRESHOLD:
            flag("degraded", f"Client has reconnected {_js_number(reconnects)} times")
    elif heartbeat is not None:
        flag("degraded", "No client diagnostics available")
    return status, issues


def _js_round(value: float) -> int:
    # Math.round: halves go up, unlike Python's banker's rounding.
    return math.floor(value + 0.5)


def _js_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


async def runner_health(
    runtime: AgentsRuntime, caller: Principal, runner_id: str
) -> dict[str, Any]:
    async with runtime.pool.acquire() as conn:
        runner = await require_owned_runner(conn, runtime, caller, runner_id)
        heartbeat = await runner_store.get_diagnostics(conn, runtime.tenant_id, runner_id)
        claims = await runner_store.active_claims(conn, runtime.tenant_id, runner_id)
        counts = await runner_store.dispatch_counts(conn, runtime.tenant_id, runner_id)
    now = datetime.now(UTC)
    liveness = liveness_status(runner, heartbeat, now)
    expiry = heartbeat.liveness_lease_expires_at if heartbeat is not None else None
    remaining_ms = max(0, round((expiry - now).total_seconds() * 1000)) if expiry else 0
    status, issues = health_issues(runner, heartbeat, liveness, now)
    return {
        "runner": {
            "id": runner.id,
            "admin_status": runner.admin_status,
            "liveness_status": liveness,
            "lease_expires_at": iso(expiry) if expiry else None,
            "lease_remaining_ms": remaining_ms,
            "wake_stream": runner.wake_stream,
            "wake_stream_offset": heartbeat.wake_stream_offset if heartbeat else None,
            "last_seen_at": iso(heartbeat.last_seen_at) if heartbeat else None,
            "created_at": iso(runner.created_at),
        },
        "client": heartbeat.diagnostics if heartbeat is not None else None,
        "claims": {
            "active_count": len(claims),
            "active": [
                {
                    "consumer_id": claim.consumer_id,
                    "epoch": claim.epoch,
                    "entity_url": claim.entity_url,
                    "stream_path": claim.stream_path,
                    "claimed_at": iso(claim.claimed_at),
                    "last_heartbeat_at": _iso_or_none(claim.last_heartbeat_at),
                    "lease_expires_at": _iso_or_none(claim.lease_expires_at),
                }
                for claim in claims
            ],
        },
        "dispatch": {
            "entities_with_active_claim": counts.entities_with_active_claim,
            "entities_with_outstanding_wake": counts.entities_with_outstanding_wake,
            "entities_with_pending_work": counts.entities_with_pending_work,
        },
        "health": {"status": status, "issues": issues},
    }


def _iso_or_none(moment: datetime | None) -> str | None:
    return iso(moment) if moment is not None else None

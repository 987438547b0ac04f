"""The built-in mock `chat` agent (spec/02 §4.14), behind `serve --mock-agent`.

It is an ordinary webhook handler that happens to live in the server process: it verifies
the forwarded wake's signature, answers `{"ok":true}` at once, and then, in a task of its
own, does what the TypeScript runtime does (spec/04 §1.5) over real HTTP on the server's
public URL: claim through the `callback` with the claim token, read the entity's main
stream, append one run per unanswered inbox message (then promote queued messages one at a
time) with the write token through an idempotent producer, and report done. Nothing here
reaches into the stores, so the mock exercises the same dispatch path as any external
handler.

What a run writes, and what the stream says is owed, is in agents/mock_chat_runs.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from electric_agents.agents.builtin_schemas import default_output_schemas
from electric_agents.agents.entity_types import register_entity_type
from electric_agents.agents.events import iso_from_datetime
from electric_agents.agents.mock_chat_runs import (
    KeyCounters,
    inbox_state,
    promotion_event,
    run_events,
)
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.errors import ApiError
from electric_agents.streams.signing import WebhookSigner, b64url_decode

log = logging.getLogger(__name__)

CHAT_TYPE_NAME = "chat"
CHAT_DESCRIPTION = "Mock chat entity for conformance and end-to-end tests."
MOCK_AGENT_HANDLER_PATH = "/_electric/mock-agent-handler"
# spec/02 §1.5: on shutdown in-flight wakes get this long to finish, then are cancelled.
DRAIN_TIMEOUT_S = 5.0
SIGNATURE_TOLERANCE_S = 300
# A bound on queued messages answered in one wake; the rest wait for the next one.
MAX_PROMOTIONS_PER_WAKE = 100
_SIGNATURE_VALUE = re.compile(r"^[A-Za-z0-9_-]+$")


def chat_type_document(public_url: str) -> dict[str, Any]:
    """The registration the reference's `registerTypes()` sends for `chat`."""
    endpoint = public_url + MOCK_AGENT_HANDLER_PATH
    return {
        "name": CHAT_TYPE_NAME,
        "description": CHAT_DESCRIPTION,
        "output_schemas": default_output_schemas(),
        "serve_endpoint": endpoint,
        "default_dispatch_policy": {
            "targets": [
                {"type": "webhook", "url": endpoint, "subscription_id": f"webhook:{CHAT_TYPE_NAME}"}
            ]
        },
    }


# --- the notification --------------------------------------------------------------------


def verify_webhook_signature(
    header: str | None, body: bytes, signer: WebhookSigner, *, now: float | None = None
) -> None:
    """spec/02 §4.4 rules, against the key the server publishes at `/__ds/jwks.json`:
    401 UNAUTHORIZED for a missing, malformed, stale, unknown-key or wrong signature."""
    if header is None or not header.strip():
        raise ApiError(401, "UNAUTHORIZED", "Missing webhook signature")
    fields: dict[str, str] = {}
    for part in header.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ApiError(401, "UNAUTHORIZED", "Invalid webhook signature")
        fields[key.strip()] = value.strip()
    timestamp, kid, signature = fields.get("t"), fields.get("kid"), fields.get("ed25519")
    if (
        timestamp is None
        or kid is None
        or signature is None
        or not (timestamp.isascii() and timestamp.isdigit())
        or not _SIGNATURE_VALUE.match(signature)
    ):
        raise ApiError(401, "UNAUTHORIZED", "Invalid webhook signature")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        raise ApiError(401, "UNAUTHORIZED", "Webhook signature expired")
    if kid != signer.kid:
        raise ApiError(401, "UNAUTHORIZED", "Unknown webhook signing key")
    public_key = Ed25519PublicKey.from_public_bytes(b64url_decode(signer.x))
    try:
        public_key.verify(b64url_decode(signature), f"{timestamp}.".encode() + body)
    except (InvalidSignature, ValueError):
        raise ApiError(401, "UNAUTHORIZED", "Invalid webhook signature") from None


@dataclass(frozen=True)
class ChatWake:
    """The fields of a forwarded wake (spec/02 §4.5) the mock acts on."""

    entity_url: str
    stream_path: str
    offset: str
    callback: str
    claim_token: str
    epoch: int
    wake_id: str


def parse_chat_wake(body: bytes) -> ChatWake:
    """400 for a body that is no wake notification; 503 for a wake of another entity type
    (what the runtime answers for a type it does not serve)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_REQUEST", "Invalid JSON body") from None
    if not isinstance(document, dict):
        raise ApiError(400, "INVALID_REQUEST", "Webhook body must be a JSON object")
    entity = document.get("entity")
    streams = document.get("streams")
    first = streams[0] if isinstance(streams, list) and streams else None
    epoch = document.get("epoch")
    callback, claim_token, wake_id, stream_path = (
        _non_empty_string(document, name)
        for name in ("callback", "claimToken", "wakeId", "streamPath")
    )
    if (
        not isinstance(entity, dict)
        or not isinstance(first, dict)
        or not isinstance(epoch, int)
        or isinstance(epoch, bool)
        or callback is None
        or claim_token is None
        or wake_id is None
        or stream_path is None
    ):
        raise ApiError(400, "INVALID_REQUEST", "Not a wake notification for an entity")
    entity_url, offset = _non_empty_string(entity, "url"), _non_empty_string(first, "offset")
    if entity_url is None or offset is None:
        raise ApiError(400, "INVALID_REQUEST", "Not a wake notification for an entity")
    if entity.get("type") != CHAT_TYPE_NAME:
        raise ApiError(503, "UNKNOWN_ENTITY_TYPE", f"Unknown entity type: {entity.get('type')}")
    return ChatWake(
        entity_url=entity_url,
        stream_path=stream_path,
        offset=offset,
        callback=callback,
        claim_token=claim_token,
        epoch=epoch,
        wake_id=wake_id,
    )


def _non_empty_string(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    return value if isinstance(value, str) and value else None


# --- the agent -------------------------------------------------------------------------------


class WakeFailed(Exception):
    """The server refused a step of the wake; the wake is given up (its lease expires)."""


class MockChatAgent:
    """Registers `chat`, accepts its wakes and runs them in tasks it tracks and drains."""

    def __init__(self, runtime: AgentsRuntime, signer: WebhookSigner) -> None:
        self._runtime = runtime
        self._signer = signer
        self._tasks: set[asyncio.Task[None]] = set()
        # One wake at a time per entity: a redelivered wake must not interleave its writes
        # with the one still running.
        self._entity_locks = _KeyedLocks()
        self._stopping = False

    async def start(self) -> None:
        """Register `chat` before the server reports ready, through the same code as
        `POST /_electric/entity-types` (an upsert, so every boot is safe)."""
        await register_entity_type(self._runtime, chat_type_document(self._runtime.public_url))
        log.info("mock chat agent registered at %s", MOCK_AGENT_HANDLER_PATH)

    async def stop(self) -> None:
        """Refuse new wakes; the running ones end after their current run and report done
        (the server still listens, `ServerApp.begin_stopping`), or are cancelled after
        `DRAIN_TIMEOUT_S`. Safe to call again."""
        self._stopping = True
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def accept_webhook(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Check the delivery and start its wake; the answer `{"ok":true}` leaves the wake
        outstanding until the task reports done (spec/02 §4.6)."""
        if self._stopping:
            raise ApiError(503, "SERVER_STOPPING", "Server is shutting down")
        verify_webhook_signature(headers.get("webhook-signature"), body, self._signer)
        wake = parse_chat_wake(body)
        task = asyncio.create_task(self._run_wake(wake), name=f"mock-agent {wake.wake_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"ok": True}

    async def _run_wake(self, wake: ChatWake) -> None:
        try:
            async with self._entity_locks.hold(wake.entity_url):
                await self._process(wake)
        except WakeFailed as error:
            log.warning("mock agent wake %s of %s: %s", wake.wake_id, wake.entity_url, error)
        except httpx.HTTPError as error:
            log.warning(
                "mock agent wake %s of %s: %s: %s",
                wake.wake_id,
                wake.entity_url,
                type(error).__name__,
                error,
            )
        except Exception:
            # Anything else is a bug here; the wake ends by its lease and is delivered again.
            log.exception("mock agent wake %s of %s failed", wake.wake_id, wake.entity_url)

    async def _process(self, wake: ChatWake) -> None:
        write_token = await self._claim(wake)
        # Whether every message this wake saw got its run; if shutdown cut the queue short,
        # done acknowledges nothing, so the rest is pending and delivered again at once.
        answered_all: bool | None = True
        try:
            producer = _IdempotentProducer(
                self._runtime.http,
                self._runtime.public_url + wake.stream_path,
                producer_id=f"entity-{wake.entity_url}",
                epoch=wake.epoch,
                write_token=write_token,
            )
            events = await self._read_stream(wake.stream_path)
            state = inbox_state(events)
            counters = KeyCounters.scan(events)
            for _ in range(state.unanswered):
                await self._write_run(producer, counters)
            # Then the queue, one message per run, re-reading in between: a client may
            # reorder, pause or delete queued messages meanwhile.
            for _ in range(MAX_PROMOTIONS_PER_WAKE):
                if state.queue_head is None:
                    break
                if self._stopping:
                    answered_all = False
                    break
                now = iso_from_datetime(datetime.now(UTC))
                await producer.append(promotion_event(state.queue_head, now))
                await self._write_run(producer, counters)
                events = await self._read_stream(wake.stream_path)
                state = inbox_state(events)
        except asyncio.CancelledError:
            # Cut off by the drain timeout: the wake is left to its lease and delivered
            # again then (the runtime skips done when aborted, spec/04 §1.5 step 8).
            answered_all = None
            raise
        finally:
            if answered_all is not None:
                await self._done(wake, acknowledge=answered_all)

    @staticmethod
    async def _write_run(producer: _IdempotentProducer, counters: KeyCounters) -> None:
        for event in run_events(counters):
            await producer.append(event)

    async def _claim(self, wake: ChatWake) -> str:
        response = await self._runtime.http.post(
            wake.callback,
            json={"epoch": wake.epoch, "wakeId": wake.wake_id},
            headers={"authorization": f"Bearer {wake.claim_token}"},
        )
        answer = _json_object(response)
        token = answer.get("writeToken")
        if response.status_code != 200 or answer.get("ok") is not True or not token:
            raise WakeFailed(f"claim answered {response.status_code}: {response.text[:200]}")
        return str(token)

    async def _read_stream(self, stream_path: str) -> list[Any]:
        """Every event of the stream: catch-up reads until up to date."""
        # The path is the raw (still percent-encoded) one the server handed out.
        url = self._runtime.public_url + stream_path
        events: list[Any] = []
        offset = "-1"
        while True:
            response = await self._runtime.http.get(url, params={"offset": offset})
            if response.status_code != 200:
                raise WakeFailed(f"reading {stream_path} answered {response.status_code}")
            batch = response.json()
            if isinstance(batch, list):
                events.extend(batch)
            next_offset = response.headers.get("Stream-Next-Offset")
            if response.headers.get("Stream-Up-To-Date") == "true" or not next_offset:
                return events
            offset = next_offset

    async def _done(self, wake: ChatWake, *, acknowledge: bool) -> None:
        acks = [{"path": wake.stream_path, "offset": wake.offset}] if acknowledge else []
        response = await self._runtime.http.post(
            wake.callback,
            json={"epoch": wake.epoch, "acks": acks, "done": True},
            headers={"authorization": f"Bearer {wake.claim_token}"},
        )
        if response.status_code != 200:
            raise WakeFailed(f"done answered {response.status_code}: {response.text[:200]}")


class _KeyedLocks:
    """A lock per key, forgotten once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _IdempotentProducer:
    """Appends one event per request with `Producer-Id`/`Epoch`/`Seq`, as the runtime's
    producer does (spec/04 §1.5 step 4): a retried request cannot write twice."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        stream_url: str,
        *,
        producer_id: str,
        epoch: int,
        write_token: str,
    ) -> None:
        self._http = http
        self._url = stream_url
        self._producer_id = producer_id
        self._epoch = epoch
        self._seq = 0
        self._write_token = write_token

    async def append(self, event: dict[str, Any]) -> None:
        response = await self._post(event)
        fenced_at = response.headers.get("Producer-Epoch")
        if response.status_code == 403 and fenced_at and fenced_at.isdigit():
            # Auto-claim, like the runtime: an older epoch is in the way (a subscription
            # re-created with a lower generation), so take the next one from seq 0.
            self._epoch, self._seq = int(fenced_at) + 1, 0
            response = await self._post(event)
        if response.status_code not in (200, 204):
            raise WakeFailed(f"append answered {response.status_code}: {response.text[:200]}")
        self._seq += 1

    async def _post(self, event: dict[str, Any]) -> httpx.Response:
        return await self._http.post(
            self._url,
            content=orjson.dumps([event]),
            headers={
                "content-type": "application/json",
                "authorization": f"Bearer {self._write_token}",
                "Producer-Id": self._producer_id,
                "Producer-Epoch": str(self._epoch),
                "Producer-Seq": str(self._seq),
            },
        )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        parsed = response.json()
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

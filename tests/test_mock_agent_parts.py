"""The mock agent's parts without a server: what one run writes, how counters and owed
runs are read from a stream, the webhook signature check, and the built-in schemas against
the events the server and the runtime write (spec/02 §4.4, §4.14, §8; spec/04 §1.4)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from electric_agents.agents import mock_agent
from electric_agents.agents.builtin_schemas import default_output_schemas
from electric_agents.agents.mock_agent import (
    ChatWake,
    MockChatAgent,
    parse_chat_wake,
    verify_webhook_signature,
)
from electric_agents.agents.mock_chat_runs import (
    MOCK_REPLY,
    InboxState,
    KeyCounters,
    inbox_state,
    promotion_event,
    run_events,
)
from electric_agents.agents.schemas import check_schema, validation_errors
from electric_agents.config import load_settings
from electric_agents.errors import ApiError
from electric_agents.streams.signing import WebhookSigner


def _insert(event_type: str, key: str) -> dict[str, Any]:
    return {"type": event_type, "key": key, "value": {}, "headers": {"operation": "insert"}}


def test_a_run_streams_the_reply_in_ten_character_deltas_between_inserts_and_updates() -> None:
    counters = KeyCounters(run=3, step=7, msg=2)
    events = run_events(counters)
    deltas = [e for e in events if e["type"] == "text_delta"]
    assert "".join(e["value"]["delta"] for e in deltas) == MOCK_REPLY
    assert [len(e["value"]["delta"]) for e in deltas] == [10, 10, 10, 10, 5]
    assert [e["key"] for e in deltas] == [f"msg-2:{i}" for i in range(5)]
    assert {e["value"]["run_id"] for e in events if "run_id" in e["value"]} == {"run-3"}
    assert [(e["type"], e["key"]) for e in events if e["type"] != "text_delta"] == [
        ("run", "run-3"),
        ("step", "step-7"),
        ("text", "msg-2"),
        ("text", "msg-2"),
        ("step", "step-7"),
        ("run", "run-3"),
    ]
    assert (counters.run, counters.step, counters.msg) == (4, 8, 3)
    # One transaction id per append, as the runtime stamps its writes.
    assert len({e["headers"]["txid"] for e in events}) == len(events)


def test_every_event_of_a_run_passes_the_builtin_schemas() -> None:
    schemas = default_output_schemas()
    for event in run_events(KeyCounters()):
        assert validation_errors(schemas[event["type"]], event["value"]) == [], event


def test_counters_continue_after_the_highest_key_of_each_family() -> None:
    events = [
        _insert("run", "run-4"),
        _insert("run", "run-1"),
        _insert("step", "step-9"),
        _insert("text", "msg-2"),
        _insert("text_delta", "msg-2:17"),
        _insert("tool_call", "tc-30"),
        _insert("inbox", "msg-in-1795619423256-66h3e6"),
        {"type": "run", "key": 5},
        "not an event",
    ]
    assert KeyCounters.scan(events) == KeyCounters(run=5, step=10, msg=3)
    assert KeyCounters.scan([]) == KeyCounters()


def _message(key: str, status: str = "processed", **value: Any) -> dict[str, Any]:
    return {
        "type": "inbox",
        "key": key,
        "value": {"status": status, **value},
        "headers": {"operation": "insert"},
    }


def _inbox(operation: str, key: str, **value: Any) -> dict[str, Any]:
    return {"type": "inbox", "key": key, "value": value, "headers": {"operation": operation}}


def test_runs_owed_are_processed_messages_minus_runs_started() -> None:
    inbox = [_message(f"m{i}") for i in range(3)]
    run_update = {"type": "run", "key": "run-0", "headers": {"operation": "update"}}
    assert inbox_state(inbox) == InboxState(unanswered=3, queue_head=None)
    assert inbox_state([*inbox, _insert("run", "run-0"), run_update]).unanswered == 2
    # Updates of a message are not new messages; a run with no message owes nothing back.
    assert inbox_state([inbox[0], _inbox("update", "m0", status="processed")]).unanswered == 1
    assert inbox_state([_insert("run", "run-0")]).unanswered == 0
    # A processed message deleted later was still answered.
    answered = [inbox[0], _insert("run", "run-0"), _inbox("delete", "m0")]
    assert inbox_state([*answered, inbox[1]]).unanswered == 1


def test_queued_messages_wait_in_position_order_behind_a_paused_one() -> None:
    queued = [
        _message("q-late", "pending", mode="queued", position="0000000000002:a0"),
        _message("q-early", "pending", mode="queued", position="0000000000001:a0"),
    ]
    assert inbox_state(queued) == InboxState(unanswered=0, queue_head="q-early")
    paused = _message("p", "pending", mode="paused", position="0000000000000:a0")
    assert inbox_state([*queued, paused]).queue_head is None
    # Unpausing (PATCH) or deleting the paused head lets the queue move.
    assert inbox_state([*queued, paused, _inbox("delete", "p")]).queue_head == "q-early"
    resumed = _inbox("update", "p", mode="queued")
    assert inbox_state([*queued, paused, resumed]).queue_head == "p"
    # Promotion makes the head a processed message that is owed a run.
    promoted = promotion_event("q-early", "2026-01-01T00:00:00.000Z")
    assert promoted["value"] == {"status": "processed", "processed_at": "2026-01-01T00:00:00.000Z"}
    assert promoted["headers"]["operation"] == "update"
    assert inbox_state([*queued, promoted]) == InboxState(unanswered=1, queue_head="q-late")


def _signer() -> WebhookSigner:
    return WebhookSigner(Ed25519PrivateKey.generate())


def test_signature_check_accepts_the_servers_own_signature_only() -> None:
    signer, other = _signer(), _signer()
    body = b'{"wake":1}'
    verify_webhook_signature(signer.signature_header(body), body, signer)
    with pytest.raises(ApiError) as refused:
        verify_webhook_signature(signer.signature_header(body), body + b" ", signer)
    assert (refused.value.status, refused.value.message) == (401, "Invalid webhook signature")
    with pytest.raises(ApiError) as unknown:
        verify_webhook_signature(other.signature_header(body), body, signer)
    assert unknown.value.message == "Unknown webhook signing key"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "Missing webhook signature"),
        ("   ", "Missing webhook signature"),
        ("t=1,kid=k,ed25519", "Invalid webhook signature"),
        ("t=abc,kid=k,ed25519=x", "Invalid webhook signature"),
        ("t=1,kid=k,ed25519=not+base64url", "Invalid webhook signature"),
        ("t=,kid=k,ed25519=x", "Invalid webhook signature"),
    ],
)
def test_malformed_signature_headers_are_401(header: str | None, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        verify_webhook_signature(header, b"{}", _signer())
    assert (refused.value.status, refused.value.code, refused.value.message) == (
        401,
        "UNAUTHORIZED",
        message,
    )


def test_signature_older_or_newer_than_five_minutes_is_expired() -> None:
    signer = _signer()
    now = float(int(time.time()))  # signatures carry whole seconds
    header = signer.signature_header(b"{}", now=now)
    verify_webhook_signature(header, b"{}", signer, now=now + 300)
    for skew in (301, -301):
        with pytest.raises(ApiError) as expired:
            verify_webhook_signature(header, b"{}", signer, now=now + skew)
        assert expired.value.message == "Webhook signature expired"


def test_builtin_schemas_are_valid_and_accept_the_events_the_server_writes() -> None:
    schemas = default_output_schemas()
    for name, schema in schemas.items():
        check_schema(schema, where=name)
    samples: list[tuple[str, Any]] = [
        ("entity_created", {"entity_type": "chat", "timestamp": "t", "args": {"a": [1]}}),
        (
            "inbox",
            {
                "from": "/principal/system%3Adev-local",
                "payload": {"text": "hi"},
                "timestamp": "t",
                "mode": "queued",
                "status": "pending",
                "position": "0000001795619423256:a0",
            },
        ),
        ("inbox", {"status": "processed", "processed_at": "t"}),  # a partial update
        (
            "signal",
            {
                "signal": "SIGTERM",
                "status": "handled",
                "sender": "/_electric/server",
                "timestamp": "t",
                "handled_at": "t",
                "handled_by": "/_electric/server",
                "outcome": "transitioned",
                "previous_state": "idle",
                "new_state": "stopped",
            },
        ),
        ("tags", {"key": "title", "value": "Hello"}),
        (
            "wake",
            {
                "timestamp": "t",
                "source": "/chat/a",
                "timeout": False,
                "changes": [{"collection": "runs", "kind": "update", "key": "run-0"}],
                "finished_child": {"url": "/w/1", "type": "w", "run_status": "completed"},
            },
        ),
        (
            "manifest",
            {
                "key": "schedule:s1",
                "kind": "schedule",
                "id": "s1",
                "scheduleType": "cron",
                "expression": "* * * * *",
                "timezone": "UTC",
                "payload": "tick",
                "wake": {"on": "change", "debounceMs": 5},
            },
        ),
        ("manifest", {"kind": "child", "id": "c", "entity_type": "w", "entity_url": "/w/c"}),
        (
            "tool_call",
            {"tool_call_id": "x", "tool_name": "bash", "status": "started", "args": {"c": 1}},
        ),
        ("run", {"status": "failed", "finish_reason": "error"}),
    ]
    for event_type, value in samples:
        assert validation_errors(schemas[event_type], value) == [], (event_type, value)


@pytest.mark.parametrize(
    ("event_type", "value"),
    [
        ("run", {"status": "done"}),
        ("run", {"finish_reason": "stop"}),
        ("run", {"status": "started", "extra": 1}),
        ("step", {"status": "started"}),
        ("step", {"step_number": 1.5, "status": "started"}),
        ("text_delta", {"text_id": "msg-0", "delta": "x"}),
        ("text", {"status": "streaming", "run_id": 3}),
        ("manifest", {"kind": "nope", "id": "x"}),
        ("tags", {"value": 1}),
    ],
)
def test_builtin_schemas_refuse_malformed_values(event_type: str, value: Any) -> None:
    assert validation_errors(default_output_schemas()[event_type], value) != []


_WAKE: dict[str, Any] = {
    "entity": {"type": "chat", "url": "/chat/a"},
    "callback": "http://127.0.0.1:1/_electric/callback-forward/w_1",
    "claimToken": "token",
    "epoch": 2,
    "wakeId": "w_1",
    "streamPath": "/chat/a/main",
    "streams": [{"path": "/chat/a/main", "offset": "0000000000000000_0000000000000412"}],
}


def test_a_forwarded_chat_wake_is_read_from_its_camel_case_fields() -> None:
    assert parse_chat_wake(orjson.dumps(_WAKE)) == ChatWake(
        entity_url="/chat/a",
        stream_path="/chat/a/main",
        offset="0000000000000000_0000000000000412",
        callback="http://127.0.0.1:1/_electric/callback-forward/w_1",
        claim_token="token",
        epoch=2,
        wake_id="w_1",
    )


@pytest.mark.parametrize(
    "change",
    [
        {"entity": None},
        {"entity": {"type": "chat"}},
        {"entity": {"type": "chat", "url": ""}},
        {"epoch": True},
        {"epoch": 1.5},
        {"streams": [{"path": "/chat/a/main"}]},
        {"streams": ["x"]},
        {"wakeId": 7},
        {"callback": None},
    ],
)
def test_a_body_missing_wake_fields_is_400(change: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        parse_chat_wake(orjson.dumps({**_WAKE, **change}))
    assert (refused.value.status, refused.value.code) == (400, "INVALID_REQUEST")


def test_a_wake_for_another_type_is_503_like_the_runtime() -> None:
    with pytest.raises(ApiError) as refused:
        parse_chat_wake(orjson.dumps({**_WAKE, "entity": {"type": "horton", "url": "/horton/a"}}))
    assert (refused.value.status, refused.value.message) == (503, "Unknown entity type: horton")


# --- the agent's task lifecycle, against a real local HTTP endpoint -----------------------------


class Callback:
    """A local HTTP endpoint standing in for the server's callback-forward route: it records
    each request line and body, and answers after `delay_s` with `status`."""

    def __init__(self, status: int, delay_s: float) -> None:
        self.status = status
        self.delay_s = delay_s
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Callback:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            self.requests.append(await reader.readexactly(length))
            await asyncio.sleep(self.delay_s)
            body = b'{"error":{"code":"UNAUTHORIZED","message":"no"}}'
            writer.write(
                f"HTTP/1.1 {self.status} X\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        yield client


def _agent(http_client: httpx.AsyncClient, port: int) -> tuple[MockChatAgent, WebhookSigner]:
    signer = _signer()
    # The agent needs only the runtime's client and public URL once a wake is accepted.
    runtime = SimpleNamespace(http=http_client, public_url=f"http://127.0.0.1:{port}")
    return MockChatAgent(cast(Any, runtime), signer), signer


def _deliver(agent: MockChatAgent, signer: WebhookSigner, port: int) -> dict[str, Any]:
    wake = {**_WAKE, "callback": f"http://127.0.0.1:{port}/_electric/callback-forward/w_1"}
    body = orjson.dumps(wake)
    return agent.accept_webhook({"webhook-signature": signer.signature_header(body)}, body)


async def test_stop_cancels_a_wake_still_running_after_the_drain_time_and_sends_no_done(
    http_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mock_agent, "DRAIN_TIMEOUT_S", 0.3)
    callback = await Callback(status=200, delay_s=30).start()
    try:
        agent, signer = _agent(http_client, callback.port)
        assert _deliver(agent, signer, callback.port) == {"ok": True}
        while not callback.requests:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await agent.stop()
        assert time.monotonic() - started < 2
        assert [orjson.loads(body) for body in callback.requests] == [
            {"epoch": 2, "wakeId": "w_1"}  # the claim only: no done after an abort
        ]
        with pytest.raises(ApiError) as refused:
            _deliver(agent, signer, callback.port)
        assert (refused.value.status, refused.value.code) == (503, "SERVER_STOPPING")
    finally:
        await callback.close()


async def test_stop_waits_for_a_wake_that_finishes_within_the_drain_time(
    http_client: httpx.AsyncClient,
) -> None:
    # The claim is refused after a moment: the wake ends (given up) on its own.
    callback = await Callback(status=401, delay_s=0.3).start()
    try:
        agent, signer = _agent(http_client, callback.port)
        _deliver(agent, signer, callback.port)
        while not callback.requests:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await agent.stop()
        assert 0.1 < time.monotonic() - started < 2
        assert len(callback.requests) == 1  # a refused claim is not followed by done
    finally:
        await callback.close()


async def test_wakes_of_one_entity_run_one_at_a_time(http_client: httpx.AsyncClient) -> None:
    callback = await Callback(status=401, delay_s=0.3).start()
    try:
        agent, signer = _agent(http_client, callback.port)
        _deliver(agent, signer, callback.port)
        _deliver(agent, signer, callback.port)  # a redelivery of the same entity's wake
        await asyncio.sleep(0.2)
        assert len(callback.requests) == 1  # the second waits for the first
        deadline = time.monotonic() + 5
        while len(callback.requests) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(callback.requests) == 2
        await agent.stop()
    finally:
        await callback.close()


@pytest.mark.parametrize(
    ("flag", "environ", "enabled"),
    [
        (None, {}, False),
        (None, {"ELECTRIC_AGENTS_MOCK_AGENT": "1"}, True),
        (None, {"ELECTRIC_AGENTS_MOCK_AGENT": " TRUE "}, True),
        (None, {"ELECTRIC_AGENTS_MOCK_AGENT": "0"}, False),
        (None, {"ELECTRIC_AGENTS_MOCK_AGENT": "  "}, False),
        (True, {}, True),
    ],
)
def test_mock_agent_setting_from_flag_or_environment(
    flag: bool | None, environ: dict[str, str], enabled: bool
) -> None:
    assert load_settings(mock_agent=flag, environ=environ).mock_agent is enabled

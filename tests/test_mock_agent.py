"""The built-in mock `chat` agent (spec/02 §4.14, §7.4-7.5) against a real
`electric-agents serve --mock-agent`: spawn `/chat/<id>`, send, and read what the agent
wrote back through the server's own dispatch (webhook, claim, write token, done).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import mint_token, read_events, unique_id
from conftest import ServerFactory, ServerProcess
from electric_agents.agents.mock_agent import CHAT_DESCRIPTION, MOCK_AGENT_HANDLER_PATH
from electric_agents.agents.mock_chat_runs import MOCK_REPLY
from electric_agents.streams.signing import WebhookSigner

WAIT_S = 10.0  # what the conformance suite allows for a reply


@pytest.fixture
def mock_server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("serve", extra_args=["--mock-agent"])


# --- helpers --------------------------------------------------------------------------------


async def spawn_chat(http: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await http.put(f"{server.origin}/_electric/entities/chat/{unique_id('c')}")
    assert response.status_code == 201, response.text
    url: str = response.json()["url"]
    return url


async def send_text(http: httpx.AsyncClient, server: ServerProcess, url: str, text: str) -> None:
    response = await http.post(
        f"{server.origin}/_electric/entities{url}/send", json={"payload": {"text": text}}
    )
    assert response.status_code == 204, response.text


def completed_runs(events: list[Any]) -> list[str]:
    return [
        event["key"]
        for event in events
        if event.get("type") == "run"
        and event.get("headers", {}).get("operation") == "update"
        and event.get("value", {}).get("status") == "completed"
    ]


async def wait_for_runs(
    http: httpx.AsyncClient, server: ServerProcess, url: str, count: int
) -> list[Any]:
    """The main stream once `count` runs completed (polled, as the suite does)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        events = await read_events(http, server, f"{url}/main")
        if len(completed_runs(events)) >= count:
            return events
        if time.monotonic() > deadline:
            shapes = [(e.get("type"), e.get("key")) for e in events]
            raise AssertionError(f"{count} runs never completed on {url}: {shapes}")
        await asyncio.sleep(0.1)


async def wait_for_status(
    http: httpx.AsyncClient, server: ServerProcess, url: str, status: str
) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        response = await http.get(f"{server.origin}/_electric/entities{url}")
        assert response.status_code == 200, response.text
        if response.json()["status"] == status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} stayed {response.json()['status']}, wanted {status}")
        await asyncio.sleep(0.1)


def agent_events(events: list[Any]) -> list[Any]:
    return [e for e in events if e.get("type") in ("run", "step", "text", "text_delta")]


def shape(event: dict[str, Any]) -> tuple[str, str, str]:
    return (event["type"], event["key"], event["headers"]["operation"])


def expected_run_shapes(n: int, deltas: int) -> list[tuple[str, str, str]]:
    return [
        ("run", f"run-{n}", "insert"),
        ("step", f"step-{n}", "insert"),
        ("text", f"msg-{n}", "insert"),
        *[("text_delta", f"msg-{n}:{i}", "insert") for i in range(deltas)],
        ("text", f"msg-{n}", "update"),
        ("step", f"step-{n}", "update"),
        ("run", f"run-{n}", "update"),
    ]


def assert_state_protocol(events: list[Any]) -> None:
    """The conformance suite's checks on agent output (spec/02 §7.5)."""
    keyed = [
        e
        for e in events
        if isinstance(e, dict) and "type" in e and "key" in e and isinstance(e.get("headers"), dict)
    ]
    first_operation: dict[tuple[str, str], str] = {}
    for event in keyed:
        first_operation.setdefault((event["type"], event["key"]), event["headers"]["operation"])
    for (event_type, key), operation in first_operation.items():
        if event_type in ("run", "step", "text"):
            assert operation == "insert", f"first {event_type} {key} is {operation}"
    step_numbers: dict[str, Any] = {}
    last_delta_seq: dict[str, int] = {}
    for event in keyed:
        value = event.get("value", {})
        if event["type"] == "text_delta":
            found = re.fullmatch(r"(.+):(\d+)", event["key"])
            assert found, event["key"]
            text_key, seq = found.group(1), int(found.group(2))
            assert value["text_id"] == text_key
            assert seq > last_delta_seq.get(text_key, -1), "delta seqs must increase"
            last_delta_seq[text_key] = seq
            assert isinstance(value["delta"], str)
        if event["type"] == "step":
            assert "step_number" in value
            number = value["step_number"]
            assert step_numbers.setdefault(event["key"], number) == number, "step_number moved"
        if (
            event["type"] in ("run", "step")
            and event["headers"]["operation"] == "update"
            and value.get("status") == "completed"
        ):
            assert value.get("finish_reason"), event
    types = {e["type"] for e in keyed}
    assert {"run", "step", "text", "text_delta"} <= types
    assert any(
        e["type"] == "text"
        and e["headers"]["operation"] == "update"
        and e["value"]["status"] == "completed"
        for e in keyed
    )


async def server_signer(server: ServerProcess) -> WebhookSigner:
    """The key the server signs its webhooks with (it keeps it in its database)."""
    assert server.database_url is not None
    pool = await asyncpg.create_pool(server.database_url, min_size=1, max_size=1)
    try:
        return await WebhookSigner.load_or_create(pool)
    finally:
        await pool.close()


# --- registration -----------------------------------------------------------------------------


async def test_mock_agent_registers_chat_with_its_handler_and_the_builtin_schemas(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    response = await http.get(f"{mock_server.origin}/_electric/entity-types/chat")
    assert response.status_code == 200, response.text
    chat = response.json()
    endpoint = mock_server.origin + MOCK_AGENT_HANDLER_PATH
    assert chat["description"] == CHAT_DESCRIPTION
    assert chat["serve_endpoint"] == endpoint
    assert chat["default_dispatch_policy"] == {
        "targets": [{"type": "webhook", "url": endpoint, "subscription_id": "webhook:chat"}]
    }
    schemas = chat["state_schemas"]
    for event_type in ("run", "step", "text", "text_delta", "tool_call", "inbox", "manifest"):
        assert event_type in schemas, event_type
    assert chat["output_schemas"] == schemas


async def test_chat_streams_refuse_events_the_builtin_schemas_refuse(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    assert mock_server.database_url is not None
    db = await asyncpg.connect(mock_server.database_url)
    try:
        token = await mint_token(db, url)
    finally:
        await db.close()
    headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}

    async def append(event: dict[str, Any]) -> httpx.Response:
        return await http.post(
            f"{mock_server.origin}{url}/main", content=orjson.dumps([event]), headers=headers
        )

    refused = await append({"type": "run", "key": "run-0", "value": {"status": "done"}})
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "SCHEMA_VALIDATION_FAILED"
    unknown = await append({"type": "reply", "key": "r", "value": {}})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "UNKNOWN_EVENT_TYPE"
    partial = {"status": "completed", "finish_reason": "stop"}
    accepted = await append({"type": "run", "key": "run-0", "value": partial})
    assert accepted.status_code in (200, 204), accepted.text


async def test_env_variable_enables_the_mock_agent(
    server_factory: ServerFactory, http: httpx.AsyncClient
) -> None:
    server = server_factory("serve", env={"ELECTRIC_AGENTS_MOCK_AGENT": "1"})
    response = await http.get(f"{server.origin}/_electric/entity-types/chat")
    assert response.status_code == 200, response.text


async def test_handler_route_is_a_bare_404_without_the_mock_agent(
    serve_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    response = await http.post(serve_server.origin + MOCK_AGENT_HANDLER_PATH, json={})
    assert response.status_code == 404
    assert response.content == b""
    types = await http.get(f"{serve_server.origin}/_electric/entity-types/chat")
    assert types.status_code == 404


async def test_handler_route_takes_only_post(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await http.request(method, mock_server.origin + MOCK_AGENT_HANDLER_PATH)
        assert response.status_code == 404, method
        assert response.content == b""


# --- a conversation ----------------------------------------------------------------------------


async def test_send_to_chat_gets_one_streamed_run_and_the_entity_goes_back_to_idle(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, url, "What is the answer?")

    events = await wait_for_runs(http, mock_server, url, 1)
    written = agent_events(events)
    deltas = [e["value"]["delta"] for e in written if e["type"] == "text_delta"]
    assert "".join(deltas) == MOCK_REPLY
    assert all(0 < len(delta) <= 10 for delta in deltas)
    assert [shape(e) for e in written] == expected_run_shapes(0, len(deltas))
    # The reply comes after the message it answers.
    inbox_at = next(i for i, e in enumerate(events) if e.get("type") == "inbox")
    assert events.index(written[0]) > inbox_at

    by_shape = {shape(e): e["value"] for e in written}
    assert by_shape[("run", "run-0", "insert")] == {"status": "started"}
    step = by_shape[("step", "step-0", "insert")]
    assert (step["step_number"], step["status"], step["run_id"]) == (1, "started", "run-0")
    assert by_shape[("text", "msg-0", "insert")] == {"status": "streaming", "run_id": "run-0"}
    assert by_shape[("text_delta", "msg-0:0", "insert")] == {
        "text_id": "msg-0",
        "run_id": "run-0",
        "delta": MOCK_REPLY[:10],
    }
    assert by_shape[("text", "msg-0", "update")] == {"status": "completed", "run_id": "run-0"}
    assert by_shape[("step", "step-0", "update")] == {
        "step_number": 1,
        "status": "completed",
        "run_id": "run-0",
        "finish_reason": "stop",
    }
    assert by_shape[("run", "run-0", "update")] == {"status": "completed", "finish_reason": "stop"}
    assert_state_protocol(events)
    await wait_for_status(http, mock_server, url, "idle")
    # Its write token died with the wake: nobody else may write as the agent now.
    late = await http.post(
        f"{mock_server.origin}{url}/main",
        content=orjson.dumps([{"type": "run", "key": "run-9", "value": {"status": "started"}}]),
        headers={"content-type": "application/json"},
    )
    assert late.status_code == 401


async def test_two_messages_get_two_runs_with_increasing_keys(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, url, "first")
    await wait_for_runs(http, mock_server, url, 1)
    await send_text(http, mock_server, url, "second")

    events = await wait_for_runs(http, mock_server, url, 2)
    written = agent_events(events)
    deltas_per_run = len([e for e in written if e["key"].startswith("msg-0:")])
    assert [shape(e) for e in written] == [
        *expected_run_shapes(0, deltas_per_run),
        *expected_run_shapes(1, deltas_per_run),
    ]
    second = [e["value"]["delta"] for e in written if e["key"].startswith("msg-1:")]
    assert "".join(second) == MOCK_REPLY
    assert_state_protocol(events)
    await wait_for_status(http, mock_server, url, "idle")
    # No extra runs: the agent's own writes wake it, but it has nothing to answer.
    await asyncio.sleep(0.5)
    assert completed_runs(await read_events(http, mock_server, f"{url}/main")) == [
        "run-0",
        "run-1",
    ]


async def test_messages_sent_back_to_back_each_get_a_run(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await asyncio.gather(*(send_text(http, mock_server, url, f"m{i}") for i in range(3)))

    events = await wait_for_runs(http, mock_server, url, 3)
    assert completed_runs(events) == ["run-0", "run-1", "run-2"]
    assert_state_protocol(events)
    await wait_for_status(http, mock_server, url, "idle")


async def test_queued_messages_are_promoted_one_run_each_and_a_paused_one_blocks_them(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    send = f"{mock_server.origin}/_electric/entities{url}/send"
    for key, mode in (("p1", "paused"), ("q1", "queued")):
        response = await http.post(send, json={"payload": key, "key": key, "mode": mode})
        assert response.status_code == 204, response.text
    await send_text(http, mock_server, url, "answer me now")
    await wait_for_runs(http, mock_server, url, 1)
    await wait_for_status(http, mock_server, url, "idle")
    events = await read_events(http, mock_server, f"{url}/main")
    # The queue waits behind the paused p1: nothing promoted, only the immediate one answered.
    assert completed_runs(events) == ["run-0"]
    queue_events = [
        (e["key"], e["headers"]["operation"])
        for e in events
        if e.get("type") == "inbox" and e["key"] in ("p1", "q1")
    ]
    assert queue_events == [("p1", "insert"), ("q1", "insert")]

    resumed = await http.patch(
        f"{mock_server.origin}/_electric/entities{url}/inbox/p1", json={"mode": "queued"}
    )
    assert resumed.status_code == 204, resumed.text
    events = await wait_for_runs(http, mock_server, url, 3)
    assert completed_runs(events) == ["run-0", "run-1", "run-2"]
    promotions = [
        (events.index(e), e["key"])
        for e in events
        if e.get("type") == "inbox"
        and e["headers"]["operation"] == "update"
        and e.get("value", {}).get("status") == "processed"
    ]
    assert [key for _, key in promotions] == ["p1", "q1"]
    run_starts = {
        e["key"]: events.index(e)
        for e in events
        if e.get("type") == "run" and e["headers"]["operation"] == "insert"
    }
    # Each promotion comes right before the run answering it.
    assert promotions[0][0] < run_starts["run-1"] < promotions[1][0] < run_starts["run-2"]
    assert_state_protocol(events)


async def test_chats_are_answered_independently(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    urls = [await spawn_chat(http, mock_server) for _ in range(3)]
    await asyncio.gather(*(send_text(http, mock_server, url, "hi") for url in urls))
    for url in urls:
        events = await wait_for_runs(http, mock_server, url, 1)
        assert completed_runs(events) == ["run-0"]  # counters are per entity


async def test_a_chat_killed_mid_conversation_stays_killed(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, url, "hi")
    killed = await http.delete(f"{mock_server.origin}/_electric/entities{url}")
    assert killed.status_code == 200, killed.text
    # Whatever the agent was doing, its claim, writes or done must not revive the entity.
    other = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, other, "still there?")
    await wait_for_runs(http, mock_server, other, 1)
    await wait_for_status(http, mock_server, url, "killed")
    # The kill closed the stream, so nothing of a later run can follow the closing signal.
    events = await read_events(http, mock_server, f"{url}/main")
    last_signal = max(i for i, e in enumerate(events) if e.get("type") == "signal")
    assert all(e.get("type") not in ("run", "step", "text") for e in events[last_signal + 1 :])


async def test_after_a_restart_the_agent_continues_the_key_counters(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, url, "before")
    await wait_for_runs(http, mock_server, url, 1)
    await wait_for_status(http, mock_server, url, "idle")

    mock_server.restart()
    chat = (await http.get(f"{mock_server.origin}/_electric/entity-types/chat")).json()
    assert chat["revision"] == 2  # registered again at boot, as an upsert
    await send_text(http, mock_server, url, "after")
    events = await wait_for_runs(http, mock_server, url, 2)
    assert completed_runs(events) == ["run-0", "run-1"]
    assert_state_protocol(events)


async def test_a_restart_mid_queue_leaves_no_wake_behind_a_lease(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    """The wake running at SIGTERM ends after its current run and reports done while the
    server still listens, acknowledging nothing, so the rest of the queue is delivered again
    by the next boot at once, not after the 30 s wake lease."""
    url = await spawn_chat(http, mock_server)
    send = f"{mock_server.origin}/_electric/entities{url}/send"
    queued = 40
    for i in range(queued):
        response = await http.post(
            send, json={"payload": f"q{i}", "key": f"q{i}", "mode": "queued"}
        )
        assert response.status_code == 204, response.text
    await wait_for_runs(http, mock_server, url, 2)

    mock_server.restart()
    events = await read_events(http, mock_server, f"{url}/main")
    assert 2 <= len(completed_runs(events)) < queued, "the restart did not land mid-queue"
    events = await wait_for_runs(http, mock_server, url, queued)
    assert completed_runs(events) == [f"run-{i}" for i in range(queued)]
    assert_state_protocol(events)
    await wait_for_status(http, mock_server, url, "idle")


# --- bad deliveries ----------------------------------------------------------------------------


async def test_unsigned_or_badly_signed_posts_to_the_handler_are_401(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    handler = mock_server.origin + MOCK_AGENT_HANDLER_PATH
    body = orjson.dumps({"entity": {"type": "chat", "url": "/chat/x"}})
    cases = {
        None: "Missing webhook signature",
        "garbage": "Invalid webhook signature",
        "t=1,kid=k": "Invalid webhook signature",
        f"t={int(time.time())},kid=nope,ed25519=abc": "Unknown webhook signing key",
        "t=1,kid=k,ed25519=abc": "Webhook signature expired",
    }
    for header, message in cases.items():
        headers = {"content-type": "application/json"}
        if header is not None:
            headers["webhook-signature"] = header
        response = await http.post(handler, content=body, headers=headers)
        assert response.status_code == 401, (header, response.text)
        assert response.json() == {"error": {"code": "UNAUTHORIZED", "message": message}}

    signer = await server_signer(mock_server)
    forged = signer.signature_header(b"something else")
    response = await http.post(handler, content=body, headers={"webhook-signature": forged})
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid webhook signature"


async def test_signed_posts_that_are_no_chat_wake_are_refused(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    handler = mock_server.origin + MOCK_AGENT_HANDLER_PATH
    signer = await server_signer(mock_server)
    wake = {
        "entity": {"type": "chat", "url": "/chat/x"},
        "callback": f"{mock_server.origin}/_electric/callback-forward/w_1",
        "claimToken": "t",
        "epoch": 1,
        "wakeId": "w_1",
        "streamPath": "/chat/x/main",
        "streams": [{"path": "/chat/x/main", "offset": "0000000000000000_0000000000000000"}],
    }
    bodies = [
        b"not json",
        b"[]",
        b"{}",
        orjson.dumps({**wake, "epoch": "1"}),
        orjson.dumps({**wake, "streams": []}),
        orjson.dumps({**wake, "claimToken": ""}),
    ]
    for body in bodies:
        signed = {"webhook-signature": signer.signature_header(body)}
        response = await http.post(handler, content=body, headers=signed)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["code"] == "INVALID_REQUEST"

    # A wake for a type it does not serve: what the runtime answers (spec/02 §4.5).
    other = orjson.dumps({**wake, "entity": {"type": "worker", "url": "/worker/x"}})
    response = await http.post(
        handler, content=other, headers={"webhook-signature": signer.signature_header(other)}
    )
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "Unknown entity type: worker"

    # A well-formed wake whose claim the server refuses is accepted, then given up.
    body = orjson.dumps(wake)
    response = await http.post(
        handler, content=body, headers={"webhook-signature": signer.signature_header(body)}
    )
    assert response.status_code == 200
    assert response.json() == {"ok": True}
    health = await http.get(f"{mock_server.origin}/_electric/health")
    assert health.status_code == 200


async def test_server_with_mock_agent_stops_cleanly_after_a_conversation(
    mock_server: ServerProcess, http: httpx.AsyncClient
) -> None:
    url = await spawn_chat(http, mock_server)
    await send_text(http, mock_server, url, "hi")
    await wait_for_runs(http, mock_server, url, 1)
    await send_text(http, mock_server, url, "and bye")  # may be in flight at shutdown
    started = time.monotonic()
    assert mock_server.stop() == 0
    assert time.monotonic() - started < 8

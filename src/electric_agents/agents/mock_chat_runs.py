"""What the mock `chat` agent (agents/mock_agent.py) reads from an entity's main stream and
what it writes back, as plain functions over events (spec/02 §4.14, §7.5; spec/04 §1.4).

A run is the lifecycle the runtime's outbound bridge writes for a one-text reply: run,
step and text inserts, `text_delta` inserts of at most 10 characters, then the text, step
and run updates. Key counters continue from the highest `run-N`/`step-N`/`msg-N` already
in the stream, as the runtime re-seeds them on each wake.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

MOCK_REPLY = "I am a mock agent response. The answer is 42."
# The conformance package's `createMockStreamFn` chunks its text into 10-character deltas.
DELTA_CHARS = 10
# The reference's MOCK_CHAT_MODEL, reported on each step.
MODEL_PROVIDER = "anthropic"
MODEL_ID = "mock-chat"
_COUNTER_KEY = re.compile(r"^(run|step|msg|tc)-(\d+)")


@dataclass
class KeyCounters:
    """The next free number of each key family (spec/04 §1.4 key schemes)."""

    run: int = 0
    step: int = 0
    msg: int = 0

    @classmethod
    def scan(cls, events: list[Any]) -> KeyCounters:
        counters = cls()
        for event in events:
            key = event.get("key") if isinstance(event, dict) else None
            found = _COUNTER_KEY.match(key) if isinstance(key, str) else None
            if found is None or found.group(1) == "tc":
                continue
            family, number = found.group(1), int(found.group(2)) + 1
            setattr(counters, family, max(getattr(counters, family), number))
        return counters


@dataclass(frozen=True)
class InboxState:
    """What the stream says the agent owes: `unanswered` runs for messages already
    processed, then `queue_head`, the queued message to promote next (spec/04 §1.16)."""

    unanswered: int
    queue_head: str | None


def inbox_state(events: list[Any]) -> InboxState:
    """The mock answers each processed message with exactly one run, so the runs owed are
    messages ever processed minus runs started: counting, not positions, since a message
    may land between a run's events. Pending messages wait in `position` order; a `paused`
    one blocks the queue, a deleted one leaves it."""
    rows: dict[str, dict[str, Any]] = {}
    processed: set[str] = set()
    runs = 0
    for event in events:
        if not isinstance(event, dict) or not isinstance(event.get("key"), str):
            continue
        headers = event.get("headers")
        operation = headers.get("operation") if isinstance(headers, dict) else None
        value = event.get("value")
        if event.get("type") == "run" and operation == "insert":
            runs += 1
        if event.get("type") != "inbox":
            continue
        key = event["key"]
        if operation == "delete":
            rows.pop(key, None)
            continue
        if operation == "insert":
            rows[key] = {}
        if key in rows and isinstance(value, dict):
            rows[key].update(value)  # updates are partial (spec/04 §1.4)
        if key in rows and rows[key].get("status") == "processed":
            processed.add(key)
    pending = sorted(
        (str(row.get("position", "")), index, key)
        for index, (key, row) in enumerate(rows.items())
        if row.get("status") == "pending"
    )
    head = pending[0][2] if pending else None
    if head is not None and rows[head].get("mode") == "paused":
        head = None
    return InboxState(unanswered=max(len(processed) - runs, 0), queue_head=head)


def promotion_event(message_key: str, now: str) -> dict[str, Any]:
    """The inbox update that takes a queued message off the queue."""
    return _event("inbox", message_key, {"status": "processed", "processed_at": now}, "update")


def _event(event_type: str, key: str, value: dict[str, Any], operation: str) -> dict[str, Any]:
    return {
        "type": event_type,
        "key": key,
        "value": value,
        "headers": {"operation": operation, "txid": str(uuid.uuid4())},
    }


def run_events(counters: KeyCounters, reply: str = MOCK_REPLY) -> list[dict[str, Any]]:
    """One run answering with `reply`, in write order; advances `counters`."""
    run_key, step_key, text_key = (
        f"run-{counters.run}",
        f"step-{counters.step}",
        f"msg-{counters.msg}",
    )
    counters.run += 1
    counters.step += 1
    counters.msg += 1
    deltas = [reply[i : i + DELTA_CHARS] for i in range(0, len(reply), DELTA_CHARS)]
    return [
        _event("run", run_key, {"status": "started"}, "insert"),
        _event(
            "step",
            step_key,
            {
                "step_number": 1,
                "status": "started",
                "run_id": run_key,
                "model_provider": MODEL_PROVIDER,
                "model_id": MODEL_ID,
            },
            "insert",
        ),
        _event("text", text_key, {"status": "streaming", "run_id": run_key}, "insert"),
        *(
            _event(
                "text_delta",
                f"{text_key}:{seq}",
                {"text_id": text_key, "run_id": run_key, "delta": delta},
                "insert",
            )
            for seq, delta in enumerate(deltas)
        ),
        _event("text", text_key, {"status": "completed", "run_id": run_key}, "update"),
        _event(
            "step",
            step_key,
            {"step_number": 1, "status": "completed", "run_id": run_key, "finish_reason": "stop"},
            "update",
        ),
        _event("run", run_key, {"status": "completed", "finish_reason": "stop"}, "update"),
    ]

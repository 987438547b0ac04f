"""JSON Schemas of the built-in entity event types (spec/04 §1.4), the TypeScript runtime's
`DEFAULT_OUTPUT_SCHEMAS`: what a type registered with them accepts on its streams.

They mirror the runtime's zod objects as `zod-to-json-schema` renders them: every object
closed (`additionalProperties: false`), optional fields left out of `required`, `unknown`
as `{}`. Values are the event `value`s, so partial updates (a run's `{status,
finish_reason}`) must pass: only what the runtime itself always sends is required.
"""

from __future__ import annotations

from typing import Any

_STRING: dict[str, Any] = {"type": "string"}
_INTEGER: dict[str, Any] = {"type": "integer"}
_BOOLEAN: dict[str, Any] = {"type": "boolean"}
_ANY: dict[str, Any] = {}
_OPEN_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": {}}
_ATTRS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}
_ENTITY_STATUS = ("spawning", "running", "idle", "paused", "stopping", "stopped", "killed")
_CHANGE_KINDS = ("insert", "update", "delete")


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _const(value: str) -> dict[str, Any]:
    return {"type": "string", "const": value}


def _object(
    required: dict[str, Any], optional: dict[str, Any] | None = None, *, row: bool = True
) -> dict[str, Any]:
    """A closed object. `row` adds what every persisted row may carry (`key`, and the
    reader's `_timeline_order`)."""
    properties: dict[str, Any] = {"key": _STRING, "_timeline_order": _STRING} if row else {}
    properties.update(required)
    properties.update(optional or {})
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema["additionalProperties"] = False
    return schema


_WAKE_CONFIG: dict[str, Any] = {
    "anyOf": [
        _const("runFinished"),
        _object({"on": _const("runFinished")}, {"includeResponse": _BOOLEAN}, row=False),
        _object(
            {"on": _const("change")},
            {
                "collections": {"type": "array", "items": _STRING},
                "ops": {"type": "array", "items": _enum(*_CHANGE_KINDS)},
                "debounceMs": {"type": "number"},
                "timeoutMs": {"type": "number"},
            },
            row=False,
        ),
    ]
}

_WAKE_CHANGE = _object(
    {"collection": _STRING, "kind": _enum(*_CHANGE_KINDS), "key": _STRING},
    {
        "value": _ANY,
        "oldValue": _ANY,
        "from": _STRING,
        "from_principal": _STRING,
        "from_agent": _STRING,
        "payload": _ANY,
        "timestamp": _STRING,
        "message_type": _STRING,
    },
    row=False,
)

_MANIFEST_VARIANTS: list[dict[str, Any]] = [
    _object(
        {
            "kind": _const("child"),
            "id": _STRING,
            "entity_type": _STRING,
            "entity_url": _STRING,
        },
        {"wake": _WAKE_CONFIG, "observed": _BOOLEAN},
    ),
    _object(
        {
            "kind": _const("source"),
            "sourceType": _STRING,
            "sourceRef": _STRING,
            "config": _OPEN_OBJECT,
        },
        {"wake": _WAKE_CONFIG},
    ),
    _object(
        {
            "kind": _const("shared-state"),
            "id": _STRING,
            "mode": _enum("create", "connect"),
            "collections": {
                "type": "object",
                "additionalProperties": _object(
                    {"type": _STRING, "primaryKey": _STRING}, row=False
                ),
            },
        },
        {"wake": _WAKE_CONFIG},
    ),
    _object({"kind": _const("effect"), "id": _STRING, "function_ref": _STRING, "config": _ANY}),
    _object(
        {
            "kind": _const("context"),
            "id": _STRING,
            "name": _STRING,
            "attrs": _ATTRS,
            "content": _STRING,
            "insertedAt": _INTEGER,
        }
    ),
    _object(
        {
            "kind": _const("schedule"),
            "id": _STRING,
            "scheduleType": _const("cron"),
            "expression": _STRING,
        },
        {"timezone": _STRING, "payload": _ANY, "wake": _WAKE_CONFIG},
    ),
    _object(
        {
            "kind": _const("schedule"),
            "id": _STRING,
            "scheduleType": _const("future_send"),
            "fireAt": _STRING,
            "targetUrl": _STRING,
            "payload": _ANY,
            "producerId": _STRING,
        },
        {
            "messageType": _STRING,
            "status": _enum("pending", "sent", "failed"),
            "sentAt": _STRING,
            "failedAt": _STRING,
            "lastError": _STRING,
        },
    ),
]


def default_output_schemas() -> dict[str, Any]:
    """A fresh map (callers may store or amend it) keyed by event `type`."""
    return {
        "run": _object(
            {"status": _enum("started", "completed", "failed")}, {"finish_reason": _STRING}
        ),
        "step": _object(
            {"step_number": _INTEGER, "status": _enum("started", "completed")},
            {
                "run_id": _STRING,
                "finish_reason": _STRING,
                "model_provider": _STRING,
                "model_id": _STRING,
                "duration_ms": _INTEGER,
            },
        ),
        "text": _object({"status": _enum("streaming", "completed")}, {"run_id": _STRING}),
        "text_delta": _object({"text_id": _STRING, "run_id": _STRING, "delta": _STRING}),
        "tool_call": _object(
            {
                "tool_name": _STRING,
                "status": _enum("started", "args_complete", "executing", "completed", "failed"),
            },
            {
                "run_id": _STRING,
                "tool_call_id": _STRING,
                "args": _ANY,
                "result": _ANY,
                "error": _STRING,
                "duration_ms": _INTEGER,
            },
        ),
        "reasoning": _object({"status": _enum("streaming", "completed")}, {"run_id": _STRING}),
        "error": _object(
            {"error_code": _STRING, "message": _STRING},
            {"run_id": _STRING, "step_id": _STRING, "tool_call_id": _STRING},
        ),
        "inbox": _object(
            {},
            {
                "from": _STRING,
                "from_principal": _STRING,
                "from_agent": _STRING,
                "payload": _ANY,
                "timestamp": _STRING,
                "message_type": _STRING,
                "mode": _enum("immediate", "queued", "paused", "steer"),
                "status": _enum("pending", "processed", "cancelled"),
                "position": _STRING,
                "processed_at": _STRING,
                "cancelled_at": _STRING,
            },
        ),
        "wake": _object(
            {
                "timestamp": _STRING,
                "source": _STRING,
                "timeout": _BOOLEAN,
                "changes": {"type": "array", "items": _WAKE_CHANGE},
            },
            {
                "finished_child": _object(
                    {
                        "url": _STRING,
                        "type": _STRING,
                        "run_status": _enum("completed", "failed"),
                    },
                    {"response": _STRING, "error": _STRING},
                    row=False,
                ),
                "other_children": {
                    "type": "array",
                    "items": _object(
                        {"url": _STRING, "type": _STRING, "status": _enum(*_ENTITY_STATUS)},
                        row=False,
                    ),
                },
            },
        ),
        "entity_created": _object(
            {"entity_type": _STRING, "timestamp": _STRING, "args": _OPEN_OBJECT},
            {"parent_url": _STRING},
        ),
        "entity_stopped": _object({"timestamp": _STRING}, {"reason": _STRING}),
        "signal": _object(
            {
                "signal": _enum(
                    "SIGINT", "SIGHUP", "SIGTERM", "SIGKILL", "SIGSTOP", "SIGCONT", "SIGUSR"
                ),
                "status": _enum("unhandled", "handled"),
                "timestamp": _STRING,
            },
            {
                "sender": _STRING,
                "reason": _STRING,
                "payload": _ANY,
                "handled_at": _STRING,
                "handled_by": _STRING,
                "outcome": _enum(
                    "transitioned",
                    "ignored",
                    "invalid_for_state",
                    "delivered",
                    "aborted",
                    "shutdown_requested",
                    "failed",
                ),
                "previous_state": _enum(*_ENTITY_STATUS),
                "new_state": _enum(*_ENTITY_STATUS),
            },
        ),
        "child_status": _object(
            {
                "entity_url": _STRING,
                "entity_type": _STRING,
                "status": _enum(*_ENTITY_STATUS),
            }
        ),
        "tags": _object({"value": _STRING}),
        "manifest": {"anyOf": _MANIFEST_VARIANTS},
        "context_inserted": _object(
            {
                "id": _STRING,
                "name": _STRING,
                "attrs": _ATTRS,
                "content": _STRING,
                "timestamp": _STRING,
            }
        ),
        "context_removed": _object({"id": _STRING, "name": _STRING, "timestamp": _STRING}),
        "replay_watermark": _object(
            {"source_id": _STRING, "offset": _STRING, "updated_at": _STRING}
        ),
    }

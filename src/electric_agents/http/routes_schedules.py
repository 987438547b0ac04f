"""Routes for schedules and cron sources (spec/02 §3.2 `POST /_electric/cron/register`,
§3.4 `PUT|DELETE …/schedules/:scheduleId`), and the scheduler worker behind them."""

from __future__ import annotations

from typing import Any

from electric_agents.agents import entities, schedules
from electric_agents.agents.entity_store import Entity
from electric_agents.agents.runtime import AgentsRuntime
from electric_agents.agents.scheduler import Scheduler
from electric_agents.http.api_schemas import MAX_INT32
from electric_agents.http.json_body import validated_body
from electric_agents.http.router import Request, Response, Route, json_response

CRON_REGISTER_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"expression": {"type": "string"}, "timezone": {"type": "string"}},
    "required": ["expression"],
}

_SCHEDULE_TYPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"scheduleType": {"enum": ["cron", "future_send"]}},
    "required": ["scheduleType"],
}

CRON_SCHEDULE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scheduleType": {"const": "cron"},
        "expression": {"type": "string"},
        "timezone": {"type": "string"},
        "debounceMs": {"type": "number", "minimum": 0, "maximum": MAX_INT32},
        "timeoutMs": {"type": "number", "minimum": 0, "maximum": MAX_INT32},
    },
    "required": ["scheduleType", "expression", "payload"],
}

FUTURE_SEND_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scheduleType": {"const": "future_send"},
        "fireAt": {"type": "string"},
        "targetUrl": {"type": "string"},
        "messageType": {"type": "string"},
        "from": {"type": "string"},
    },
    "required": ["scheduleType", "payload", "fireAt"],
}


def routes(runtime: AgentsRuntime) -> list[Route]:
    scheduler = Scheduler(runtime)
    runtime.add_worker("scheduler", scheduler.run)

    async def existing(request: Request) -> Entity:
        return await entities.require_entity(
            runtime, request.params["type"], request.params["instanceId"]
        )

    async def register_cron(request: Request) -> Response:
        body = validated_body(request.body, CRON_REGISTER_BODY_SCHEMA)
        stream_url = await schedules.register_cron_source(
            runtime, body["expression"], body.get("timezone")
        )
        scheduler.nudge()
        return json_response(200, {"streamUrl": stream_url})

    async def put_schedule(request: Request) -> Response:
        entity = await existing(request)
        schedule_id = request.param("scheduleId")
        body = validated_body(request.body, _SCHEDULE_TYPE_SCHEMA)
        if body["scheduleType"] == "cron":
            body = validated_body(request.body, CRON_SCHEDULE_BODY_SCHEMA)
            txid = await schedules.upsert_cron_schedule(
                runtime,
                entity.url,
                schedule_id,
                schedules.CronSchedule(
                    expression=body["expression"],
                    timezone=body.get("timezone"),
                    payload=body["payload"],
                    debounce_ms=_whole_ms(body.get("debounceMs")),
                    timeout_ms=_whole_ms(body.get("timeoutMs")),
                ),
            )
        else:
            body = validated_body(request.body, FUTURE_SEND_BODY_SCHEMA)
            txid = await schedules.upsert_future_send(
                runtime,
                request.principal,
                entity.url,
                schedule_id,
                schedules.FutureSendSchedule(
                    payload=body["payload"],
                    fire_at=body["fireAt"],
                    target_url=body.get("targetUrl"),
                    message_type=body.get("messageType"),
                    claimed_from=body.get("from"),
                ),
            )
        scheduler.nudge()
        return json_response(200, {"txid": txid})

    async def delete_schedule(request: Request) -> Response:
        entity = await existing(request)
        txid = await schedules.delete_schedule(runtime, entity.url, request.param("scheduleId"))
        return json_response(200, {"txid": txid})

    schedule_path = "/_electric/entities/:type/:instanceId/schedules/:scheduleId"
    return [
        Route("POST", "/_electric/cron/register", register_cron),
        Route("PUT", schedule_path, put_schedule),
        Route("DELETE", schedule_path, delete_schedule),
    ]


def _whole_ms(value: float | None) -> int | None:
    return None if value is None else int(value)

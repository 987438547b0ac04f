"""The `__ds` control routes under the stream root (spec/01 §A.19), as a plain ASGI app that
StreamsApp hands every `__ds` request to. It parses requests into SubscriptionService calls
and renders their results; the rules live in the service.

    GET    __ds/jwks.json
    PUT    __ds/subscriptions/:id              create (201) or confirm (200)
    GET    __ds/subscriptions/:id
    DELETE __ds/subscriptions/:id              204
    POST   __ds/subscriptions/:id/streams      {streams:[…]} -> 204
    DELETE __ds/subscriptions/:id/streams/:p   204 (p percent-encoded)
    POST   __ds/subscriptions/:id/callback     Bearer token -> {ok, next_wake}
    POST   __ds/subscriptions/:id/claim        {worker} -> {wake_id, generation, token, …}
    POST   __ds/subscriptions/:id/ack          Bearer token -> {ok, next_wake}
    POST   __ds/subscriptions/:id/release      Bearer token -> 204
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson

from electric_agents.errors import ApiError, bad_request
from electric_agents.http.responses import (
    Receive,
    Scope,
    Send,
    header_map,
    read_body,
    send_error,
    send_json,
    send_response,
)
from electric_agents.streams.subscription_service import SubscriptionService, WakeReport
from electric_agents.streams.subscriptions import (
    json_integer,
    normalize_path,
    parse_stream_list,
    parse_subscription_config,
    validate_subscription_id,
)
from electric_agents.streams.wakes import Ack

MAX_CONTROL_BODY_BYTES = 1024 * 1024
MAX_WORKER_LENGTH = 256
JWKS_HEADERS = {"Content-Type": "application/jwk-set+json", "Cache-Control": "public, max-age=300"}


class SubscriptionsApp:
    def __init__(self, service: SubscriptionService, *, prefix: str) -> None:
        self.service = service
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._route(scope, receive, send)
        except ApiError as error:
            await send_error(send, error)

    def _segments(self, scope: Scope) -> list[str]:
        """The raw (still percent-encoded) path segments after `__ds`."""
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        path = raw.split("?", 1)[0][len(self.prefix) :].lstrip("/")
        return [segment for segment in path.split("/")[1:] if segment]

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        segments = self._segments(scope)
        if segments == ["jwks.json"]:
            _allow(method, "GET")
            await send_response(send, 200, JWKS_HEADERS, orjson.dumps(self.service.jwks()))
            return
        if len(segments) < 2 or segments[0] != "subscriptions":
            raise ApiError(404, "SUBSCRIPTION_NOT_FOUND", "Durable Streams control route not found")
        subscription_id = validate_subscription_id(unquote(segments[1]))
        action = segments[2] if len(segments) > 2 else None
        if action is None:
            await self._subscription(scope, receive, send, method, subscription_id)
        elif action == "streams" and len(segments) == 3:
            _allow(method, "POST")
            body = await _json_object(receive)
            paths = parse_stream_list(body.get("streams"), allow_empty=False)
            await self.service.add_streams(subscription_id, paths)
            await send_response(send, 204)
        elif action == "streams":
            _allow(method, "DELETE")
            path = normalize_path(unquote("/".join(segments[3:])))
            await self.service.remove_stream(subscription_id, path)
            await send_response(send, 204)
        elif action in ("callback", "ack") and len(segments) == 3:
            _allow(method, "POST")
            token = _bearer_token(scope)
            report = _wake_report(await _json_object(receive))
            if action == "callback":
                next_wake = await self.service.callback(subscription_id, token, report)
            else:
                next_wake = await self.service.ack(subscription_id, token, report)
            await send_json(send, 200, {"ok": True, "next_wake": next_wake})
        elif action == "claim" and len(segments) == 3:
            _allow(method, "POST")
            worker = (await _json_object(receive)).get("worker")
            if not isinstance(worker, str) or not worker or len(worker) > MAX_WORKER_LENGTH:
                raise bad_request("worker must be a non-empty string")
            await send_json(send, 200, await self.service.claim(subscription_id, worker))
        elif action == "release" and len(segments) == 3:
            _allow(method, "POST")
            token = _bearer_token(scope)
            report = _wake_report(await _json_object(receive))
            await self.service.release(subscription_id, token, report.wake_id, report.generation)
            await send_response(send, 204)
        else:
            raise ApiError(404, "SUBSCRIPTION_NOT_FOUND", "Durable Streams control route not found")

    async def _subscription(
        self, scope: Scope, receive: Receive, send: Send, method: str, subscription_id: str
    ) -> None:
        if method == "PUT":
            config = parse_subscription_config(await _json_body(receive))
            created, document = await self.service.create_or_confirm(subscription_id, config)
            await send_json(send, 201 if created else 200, document)
        elif method == "GET":
            await send_json(send, 200, await self.service.get(subscription_id))
        elif method == "DELETE":
            await self.service.delete(subscription_id)
            await send_response(send, 204)
        else:
            _allow(method, "PUT, GET, DELETE")


def _allow(method: str, allowed: str) -> None:
    if method not in allowed.split(", "):
        raise ApiError(
            405, "METHOD_NOT_ALLOWED", f"Method {method} is not allowed here; use {allowed}"
        )


async def _json_body(receive: Receive) -> Any:
    """The request's JSON; an empty body reads as `{}` (as the reference does)."""
    raw = await read_body(receive, MAX_CONTROL_BODY_BYTES)
    if not raw.strip():
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("Invalid JSON body") from None


async def _json_object(receive: Receive) -> dict[str, Any]:
    body = await _json_body(receive)
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    return body


def _bearer_token(scope: Scope) -> str:
    scheme, _, token = header_map(scope["headers"]).get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "TOKEN_INVALID", "Missing or malformed Authorization header")
    return token.strip()


def _wake_report(body: dict[str, Any]) -> WakeReport:
    wake_id = body.get("wake_id")
    if wake_id is not None and not isinstance(wake_id, str):
        raise bad_request("wake_id must be a string")
    raw_generation = body.get("generation")
    generation = json_integer(raw_generation)
    if raw_generation is not None and generation is None:
        raise bad_request("generation must be an integer")
    done = body.get("done")
    if done is not None and not isinstance(done, bool):
        raise bad_request("done must be a boolean")
    raw_acks = body.get("acks")
    if raw_acks is None:
        raw_acks = []
    if not isinstance(raw_acks, list):
        raise bad_request("acks must be an array")
    acks: list[Ack] = []
    for item in raw_acks:
        stream = item.get("stream", item.get("path")) if isinstance(item, dict) else None
        offset = item.get("offset") if isinstance(item, dict) else None
        if not isinstance(stream, str) or not isinstance(offset, str):
            raise bad_request("each ack needs a string stream (or path) and a string offset")
        acks.append(Ack(stream, offset))
    return WakeReport(
        wake_id=wake_id,
        generation=generation,
        acks=acks,
        done=done is True,
    )

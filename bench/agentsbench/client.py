"""Just enough of the agents HTTP API (spec/02) for the bench: the control-plane calls a
client makes (register a type, spawn, send, read an entity) and the calls a webhook handler
makes for a wake (claim, write with the write token, done; spec/02 §4.7-4.8)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from streambench.wire import ProtocolError

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class WakeNotice:
    """The fields of a forwarded webhook body (spec/02 §4.5) that the handler acts on."""

    entity_url: str
    main_stream: str
    callback: str
    claim_token: str
    epoch: int
    wake_id: str
    stream_path: str
    offset: str

    @classmethod
    def parse(cls, body: dict[str, Any]) -> WakeNotice:
        entity = body["entity"]
        return cls(
            entity_url=entity["url"],
            main_stream=entity["streams"]["main"],
            callback=body["callback"],
            claim_token=body["claimToken"],
            epoch=body["epoch"],
            wake_id=body["wakeId"],
            stream_path=body["streamPath"],
            offset=body["streams"][0]["offset"],
        )

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.claim_token}"}


async def _expect(resp: aiohttp.ClientResponse, expected: tuple[int, ...], what: str) -> bytes:
    body = await resp.read()
    if resp.status not in expected:
        text = body[:300].decode(errors="replace")
        raise ProtocolError(f"{what} -> {resp.status}: {text}")
    return body


class AgentsClient:
    def __init__(self, base_url: str, http: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http

    def entity_route(self, entity_url: str) -> str:
        return f"{self.base_url}/_electric/entities{entity_url}"

    async def register_type(self, name: str, dispatch_target: dict[str, Any] | None = None) -> None:
        body: dict[str, Any] = {"name": name, "description": "agents benchmark"}
        if dispatch_target is not None:
            body["default_dispatch_policy"] = {"targets": [dispatch_target]}
        url = f"{self.base_url}/_electric/entity-types"
        async with self.http.post(url, json=body) as resp:
            await _expect(resp, (201,), f"register type {name}")

    async def spawn(
        self, type_name: str, instance_id: str, body: dict[str, Any] | None = None
    ) -> str:
        """PUT /_electric/entities/<type>/<id> (spec/02 §3.4), with `{}` unless the `body`
        (`parent`, `wake`, `initialMessage`...) is given; returns the entity URL."""
        url = f"{self.base_url}/_electric/entities/{type_name}/{quote(instance_id, safe='')}"
        data = json.dumps(body).encode() if body is not None else b"{}"
        async with self.http.put(url, data=data, headers=JSON_HEADERS) as resp:
            body = await _expect(resp, (201,), f"spawn {type_name}/{instance_id}")
        entity_url: str = json.loads(body)["url"]
        return entity_url

    async def send(self, entity_url: str, payload: Any) -> None:
        """POST .../send (spec/02 §3.4): an inbox message, answered 204."""
        data = json.dumps({"payload": payload}).encode()
        async with self.http.post(
            f"{self.entity_route(entity_url)}/send", data=data, headers=JSON_HEADERS
        ) as resp:
            await _expect(resp, (204,), f"send to {entity_url}")

    async def entity_status(self, entity_url: str) -> str:
        async with self.http.get(self.entity_route(entity_url)) as resp:
            body = await _expect(resp, (200,), f"get {entity_url}")
        status: str = json.loads(body)["status"]
        return status

    async def put_schedule(self, entity_url: str, schedule_id: str, body: dict[str, Any]) -> None:
        """PUT .../schedules/<id> (spec/02 §3.4): a cron schedule or a future send."""
        url = f"{self.entity_route(entity_url)}/schedules/{quote(schedule_id, safe='')}"
        async with self.http.put(url, data=json.dumps(body).encode(), headers=JSON_HEADERS) as resp:
            await _expect(resp, (200,), f"schedule {schedule_id} of {entity_url}")

    async def delete_schedule(self, entity_url: str, schedule_id: str) -> None:
        url = f"{self.entity_route(entity_url)}/schedules/{quote(schedule_id, safe='')}"
        async with self.http.delete(url) as resp:
            await _expect(resp, (200,), f"delete schedule {schedule_id} of {entity_url}")

    # --- what a webhook handler does for one wake ------------------------------------------

    async def claim(self, wake: WakeNotice) -> str:
        """Claim through the callback with the wake's claim token; returns the write token."""
        data = json.dumps({"epoch": wake.epoch, "wakeId": wake.wake_id}).encode()
        async with self.http.post(
            wake.callback, data=data, headers={**JSON_HEADERS, **wake.bearer}
        ) as resp:
            body = await _expect(resp, (200,), f"claim {wake.wake_id}")
        write_token: str = json.loads(body)["writeToken"]
        return write_token

    async def write_events(
        self, wake: WakeNotice, write_token: str, events: list[dict[str, Any]]
    ) -> None:
        """Append to the entity's main stream, authorised by the claim's write token."""
        headers = {**JSON_HEADERS, "Authorization": f"Bearer {write_token}"}
        async with self.http.post(
            self.base_url + wake.main_stream, data=json.dumps(events).encode(), headers=headers
        ) as resp:
            await _expect(resp, (200, 204), f"write to {wake.main_stream}")

    async def done(self, wake: WakeNotice) -> None:
        """Report the wake done, acknowledging the stream up to the offset it named."""
        body = {
            "epoch": wake.epoch,
            "acks": [{"path": wake.stream_path, "offset": wake.offset}],
            "done": True,
        }
        async with self.http.post(
            wake.callback, data=json.dumps(body).encode(), headers={**JSON_HEADERS, **wake.bearer}
        ) as resp:
            answer = await _expect(resp, (200,), f"done {wake.wake_id}")
        if json.loads(answer).get("ok") is not True:
            raise ProtocolError(f"done {wake.wake_id} was not acknowledged: {answer[:200]!r}")

"""A real webhook receiver for tests: a small HTTP/1.1 server on 127.0.0.1, in the test's
event loop, that records every POST and answers as the test scripts. Both the `__ds`
subscription deliveries (spec/01 §A.19) and the agents layer's wakes (spec/02 §4.5-4.8)
arrive this way, so one receiver serves the tests of both.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

WAIT_TIMEOUT_S = 15.0
SIGNATURE_MAX_AGE_S = 300


@dataclass
class Delivery:
    """One POST the receiver got."""

    headers: dict[str, str]  # names lower-cased
    raw_body: bytes  # as sent: the signature covers these bytes
    received_at: float  # time.monotonic(), for tests that measure retry backoff

    @property
    def body(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.raw_body)
        return parsed


# The receiver's reply to a delivery: an HTTP status and a JSON body.
Answer = Callable[[Delivery], Awaitable[tuple[int, Any]]]


async def answer_received(_: Delivery) -> tuple[int, Any]:
    return 200, {}


async def answer_done(_: Delivery) -> tuple[int, Any]:
    return 200, {"done": True}


@dataclass
class WebhookReceiver:
    """An HTTP/1.1 server on 127.0.0.1 that records POSTs to `path` and answers as `answer`
    says. `answer` may be replaced while the receiver runs; it applies from the next POST."""

    answer: Answer = answer_received
    path: str = "/webhook"
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0  # 0 picks a free port; a restart after `close()` reuses the first one
    _server: asyncio.Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Kept-alive connections would otherwise hold `wait_closed()` open.
            for connection in list(self._connections):
                connection.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def wait_for_deliveries(
        self, count: int, timeout_s: float = WAIT_TIMEOUT_S
    ) -> list[Delivery]:
        """Wait until at least `count` POSTs arrived; all of them so far. Raises
        AssertionError on timeout, so a test may also use it to wait for one that may come."""
        deadline = time.monotonic() + timeout_s
        while len(self.deliveries) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.url} got {len(self.deliveries)} deliveries, wanted {count}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.deliveries

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:  # the server keeps connections alive between deliveries
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                delivery = Delivery(headers, body, time.monotonic())
                self.deliveries.append(delivery)
                self._arrived.set()
                status, answer = await self.answer(delivery)
                payload = orjson.dumps(answer)
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # closed by the test: end this connection quietly
        finally:
            self._connections.discard(task)
            writer.close()


def signature_is_valid(delivery: Delivery, jwks: dict[str, Any]) -> bool:
    """Verify `webhook-signature` (`t=…,kid=…,ed25519=…`) as a receiver must: an Ed25519
    signature over `t.body` by a key the server publishes, made within the last 5 minutes."""
    fields = dict(part.split("=", 1) for part in delivery.headers["webhook-signature"].split(","))
    keys = [key for key in jwks["keys"] if key["kid"] == fields["kid"]]
    if not keys:
        return False
    public = Ed25519PublicKey.from_public_bytes(_b64url_decode(keys[0]["x"]))
    try:
        signed = fields["t"].encode() + b"." + delivery.raw_body
        public.verify(_b64url_decode(fields["ed25519"]), signed)
    except InvalidSignature:
        return False
    return abs(time.time() - int(fields["t"])) <= SIGNATURE_MAX_AGE_S


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

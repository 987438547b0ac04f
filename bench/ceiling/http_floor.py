"""The fastest a Python HTTP/1.1 server can answer an append on this machine.

A keep-alive server on uvloop + httptools (what `electric-agents` runs on) that answers
every request with a fixed 204 and does nothing else: no routing, no checks, no storage.
Its appends/s under `bench/load/append-load.mjs` is the ceiling for any Python server
here, set by the event loop, the parser and one send/recv per request; see
docs/benchmarks.md ("Ceilings").

    .venv/bin/python bench/ceiling/http_floor.py --port 5510 --seconds 12 &
    node bench/load/append-load.mjs --url http://127.0.0.1:5510/v1/stream/x \
        --connections 32 --duration-s 5
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools
import uvloop

RESPONSE = (
    b"HTTP/1.1 204 No Content\r\nstream-next-offset: 0000000000000000_0000000000000000\r\n\r\n"
)


class FixedResponseProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has the asyncio.Transport API without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)


async def serve(port: int, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FixedResponseProtocol, "127.0.0.1", port)
    async with server:
        await asyncio.sleep(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5510)
    parser.add_argument("--seconds", type=float, default=12.0, help="stop after this long")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.seconds))


if __name__ == "__main__":
    main()

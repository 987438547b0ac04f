"""Just enough of the Durable Streams wire protocol for the Python-side clients."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

# Compare raw transfer: the reference gzips bodies >= 1 KiB when the client allows it.
NO_COMPRESSION = {"Accept-Encoding": "identity"}


class ProtocolError(RuntimeError):
    pass


def session(connections: int = 1, timeout_s: float | None = 60.0) -> aiohttp.ClientSession:
    """A keep-alive session holding at most `connections` sockets (0 = unlimited).

    `timeout_s` bounds each whole request; None is for SSE readers, which are cancelled by
    their owner instead.
    """
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10),
        headers=NO_COMPRESSION,
        auto_decompress=False,
    )


async def create_stream(
    http: aiohttp.ClientSession, url: str, content_type: str, body: bytes = b""
) -> str:
    """PUT a new stream; returns its tail offset."""
    async with http.put(url, data=body, headers={"Content-Type": content_type}) as resp:
        await resp.read()
        if resp.status != 201:
            raise ProtocolError(f"PUT {url} -> {resp.status}, expected 201")
        return resp.headers.get("Stream-Next-Offset", "")


async def append(http: aiohttp.ClientSession, url: str, body: bytes, content_type: str) -> str:
    """POST one message; returns the new tail offset."""
    async with http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
        await resp.read()
        if resp.status not in (200, 204):
            raise ProtocolError(f"POST {url} -> {resp.status}")
        return resp.headers["Stream-Next-Offset"]


async def tail_offset(http: aiohttp.ClientSession, url: str) -> str:
    async with http.head(url) as resp:
        if resp.status != 200:
            raise ProtocolError(f"HEAD {url} -> {resp.status}")
        return resp.headers["Stream-Next-Offset"]


@dataclass(frozen=True)
class SseEvent:
    kind: str  # "data" or "control"
    data: str


class SseParser:
    """Incremental `text/event-stream` parser: feed bytes, get complete events back."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk.replace(b"\r\n", b"\n")
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        events = []
        for block in blocks:
            kind = "message"
            data_lines: list[str] = []
            for line in block.decode().split("\n"):
                field, _, value = line.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if field == "event":
                    kind = value
                elif field == "data":
                    data_lines.append(value)
            if data_lines:
                events.append(SseEvent(kind, "\n".join(data_lines)))
        return events

"""A live reader of one JSON stream (spec/01 long-poll reads), for figures measured at the
moment an event reaches a reader: back-to-back `?live=long-poll` GETs from the stream's
start, each event kept with the time its response body was in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from streambench.wire import ProtocolError

Match = Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Arrival:
    event: dict[str, Any]
    at: float  # time.perf_counter() when the response holding it was read
    wall: float  # time.time() at the same moment, to compare with server timestamps


class LiveReader:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.arrivals: list[Arrival] = []
        self.failure: BaseException | None = None
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> LiveReader:
        self._task = asyncio.create_task(self._follow())
        return self

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def matching(self, match: Match) -> list[Arrival]:
        return [a for a in self.arrivals if match(a.event)]

    async def wait_for(self, match: Match, count: int, timeout_s: float) -> list[Arrival]:
        """The first `count` events `match` accepts, already read or arriving within
        `timeout_s` (TimeoutError otherwise; the reader's own failure is raised as is)."""

        def enough() -> bool:
            if self.failure is not None:
                raise self.failure
            return len(self.matching(match)) >= count

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(enough)
        return self.matching(match)[:count]

    async def first(self, match: Match, timeout_s: float) -> Arrival:
        return (await self.wait_for(match, 1, timeout_s))[0]

    async def _follow(self) -> None:
        offset = "-1"
        try:
            while True:
                params = {"offset": offset, "live": "long-poll"}
                async with self.http.get(self.url, params=params) as resp:
                    body = await resp.read()
                    at, wall = time.perf_counter(), time.time()
                    if resp.status not in (200, 204):
                        text = body[:300].decode(errors="replace")
                        raise ProtocolError(f"GET {self.url} -> {resp.status}: {text}")
                    offset = resp.headers.get("Stream-Next-Offset", offset)
                if resp.status == 200 and body.strip():
                    self.arrivals.extend(Arrival(e, at, wall) for e in json.loads(body))
                    async with self._changed:
                        self._changed.notify_all()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # raised to whoever waits, now or later
            self.failure = exc
            async with self._changed:
                self._changed.notify_all()

"""The webhook handler the server dispatches to, running in the bench process on 127.0.0.1.

Three routes, two ways of answering a wake (spec/02 §4.6):

* `/done` answers `{"done":true}` at once, so the wake is acknowledged by the response.
* `/cycle` does what the TypeScript runtime does (spec/04 §1.5): answers `{"ok":true}`, then
  claims through the `callback` with the claim token, appends one event to the entity's main
  stream with the write token, and reports done through the callback. The event it wrote is
  new data on the stream, so the server wakes it once more; that follow-up wake is claimed
  and reported done without writing, as the runtime would after finding nothing new.
* `/run` is `/cycle` with a child's run as the write (spec/03 §4 runFinished): a `run`
  insert and its `text_delta`s in one append, then the `run` update to `completed` in a second
  one, its start time kept on the expectation (the moment a parent's runFinished wake is
  measured from).

A measuring coroutine registers an `Expectation` for an entity before it sends, and the
receiver resolves its futures as the wake arrives and the cycle completes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agentsbench.client import AgentsClient, WakeNotice

DONE_ROUTE = "/done"
CYCLE_ROUTE = "/cycle"
RUN_ROUTE = "/run"
RUN_KEY = "run-1"
RUN_DELTAS = ("Hello, ", "world")  # the child's response, as runFinished reports it


def _future() -> asyncio.Future[float]:
    return asyncio.get_running_loop().create_future()


@dataclass
class Expectation:
    sent_at: float  # time.perf_counter() just before the send request
    arrived: asyncio.Future[float] = field(default_factory=_future)
    finished: asyncio.Future[float] = field(default_factory=_future)  # done acknowledged
    settled: asyncio.Future[float] = field(default_factory=_future)  # follow-up wake done
    steps_ms: dict[str, float] = field(default_factory=dict)  # claim / write / done round trips
    run_finished_at: float | None = None  # just before the `run` update's append (/run)


# What the handler writes on an entity's first wake, with the claim's write token.
Writer = Callable[[AgentsClient, WakeNotice, str, Expectation | None], Awaitable[None]]


def _event(event_type: str, key: str, value: Any, operation: str = "insert") -> dict[str, Any]:
    return {"type": event_type, "key": key, "value": value, "headers": {"operation": operation}}


async def write_reply(
    client: AgentsClient, wake: WakeNotice, token: str, _: Expectation | None
) -> None:
    await client.write_events(wake, token, [_event("bench_reply", wake.wake_id, {"ok": True})])


async def write_run(
    client: AgentsClient, wake: WakeNotice, token: str, expectation: Expectation | None
) -> None:
    """A run as the runtime writes one: started with its text, then completed."""
    started = [_event("run", RUN_KEY, {"status": "started"})]
    started += [
        _event("text_delta", f"td-{i}", {"run_id": RUN_KEY, "delta": delta})
        for i, delta in enumerate(RUN_DELTAS)
    ]
    await client.write_events(wake, token, started)
    if expectation is not None:
        expectation.run_finished_at = time.perf_counter()
    finished = _event("run", RUN_KEY, {"status": "completed"}, "update")
    await client.write_events(wake, token, [finished])


class WebhookReceiver:
    def __init__(self, client: AgentsClient) -> None:
        self.client = client
        self.unexpected_wakes = 0  # wakes for an entity nobody was waiting on
        self.unexpected_failures: list[str] = []  # their cycles' errors (nobody awaits them)
        self._expected: dict[str, Expectation] = {}
        self._cycles: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.port}{route}"

    async def start(self) -> WebhookReceiver:
        app = web.Application()
        app.router.add_post(DONE_ROUTE, self._answer_done)
        app.router.add_post(CYCLE_ROUTE, self._answer_ok_then(write_reply))
        app.router.add_post(RUN_ROUTE, self._answer_ok_then(write_run))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        for task in list(self._cycles):
            task.cancel()
        if self._cycles:
            await asyncio.wait(self._cycles, timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()

    def expect(self, entity_url: str, sent_at: float) -> Expectation:
        expectation = Expectation(sent_at)
        self._expected[entity_url] = expectation
        return expectation

    def forget(self, entity_url: str) -> None:
        self._expected.pop(entity_url, None)

    async def _read_wake(self, request: web.Request) -> tuple[float, WakeNotice]:
        arrived = time.perf_counter()
        return arrived, WakeNotice.parse(json.loads(await request.read()))

    async def _answer_done(self, request: web.Request) -> web.Response:
        arrived, wake = await self._read_wake(request)
        expectation = self._expected.pop(wake.entity_url, None)
        if expectation is None:
            self.unexpected_wakes += 1
        else:
            expectation.arrived.set_result(arrived)
        return web.json_response({"done": True})

    def _answer_ok_then(self, write: Writer) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def answer_ok_then_cycle(request: web.Request) -> web.Response:
            arrived, wake = await self._read_wake(request)
            expectation = self._expected.get(wake.entity_url)
            first = expectation is not None and not expectation.arrived.done()
            if expectation is None:
                self.unexpected_wakes += 1
            elif first:
                expectation.arrived.set_result(arrived)
            else:
                self._expected.pop(wake.entity_url, None)  # the follow-up ends this expectation
            task = asyncio.create_task(self._cycle(wake, expectation, first, write))
            self._cycles.add(task)
            task.add_done_callback(self._cycles.discard)
            return web.json_response({"ok": True})

        return answer_ok_then_cycle

    async def _cycle(
        self, wake: WakeNotice, expectation: Expectation | None, first: bool, write: Writer
    ) -> None:
        outcome = expectation.finished if first else expectation.settled if expectation else None
        try:
            started = time.perf_counter()
            write_token = await self.client.claim(wake)
            claimed = time.perf_counter()
            if first:
                await write(self.client, wake, write_token, expectation)
            written = time.perf_counter()
            await self.client.done(wake)
            finished = time.perf_counter()
        except Exception as exc:  # reported to whoever waits on this wake
            if outcome is None:
                self.unexpected_failures.append(f"{wake.entity_url}: {type(exc).__name__}: {exc}")
            elif not outcome.done():
                outcome.set_exception(exc)
            return
        if first and expectation is not None:
            expectation.steps_ms.update(
                claim=(claimed - started) * 1000,
                write=(written - claimed) * 1000,
                done=(finished - written) * 1000,
            )
        if outcome is not None and not outcome.done():
            outcome.set_result(finished)

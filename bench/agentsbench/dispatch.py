"""Scenarios 3-4: latency from a send to the webhook handler (spec/02 §4.5-4.7).

The entities' type has a default webhook dispatch policy with a `subscription_id`, as the
TypeScript runtime registers it (spec/02 §4.2 (b)), so each entity has a subscription of its
own and one entity's outstanding wake never delays another's. Sends are sequential and
rotate over a few entities; each entity gets one unmeasured round first.

3. The handler answers `{"done":true}`; latency = send start -> the wake's request arrived.
4. The handler runs the full cycle (see receiver.py); latency = send start -> its done
   callback acknowledged. The follow-up wake for the handler's own write is let finish before
   the entity is used again, and every entity must be back to `idle` at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from agentsbench.client import AgentsClient
from agentsbench.config import AgentsBenchConfig
from agentsbench.receiver import CYCLE_ROUTE, DONE_ROUTE, Expectation, WebhookReceiver
from agentsbench.throughput import SEND_PAYLOAD, bench_name
from streambench.model import WorkloadResult
from streambench.servers import RunningServer
from streambench.stats import summarize_ms
from streambench.wire import ProtocolError, session

ARRIVAL_SECTION = '3. send -> webhook arrival (handler answers {"done":true})'
CYCLE_SECTION = "4. send -> claim -> write -> done (handler answers ok, then uses the callback)"
WAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 10.0
MAX_FAILURES = 10

# (entity URL, whether this round is measured) -> one send and whatever it sets off
Round = Callable[[str, bool], Awaitable[None]]


async def dispatched_type(client: AgentsClient, receiver: WebhookReceiver, route: str) -> str:
    """A fresh type whose entities are dispatched to `route` of the receiver."""
    type_name = bench_name("hooked")
    target = {
        "type": "webhook",
        "url": receiver.url(route),
        "subscription_id": f"webhook:{type_name}",
    }
    await client.register_type(type_name, target)
    return type_name


async def _dispatched_entities(
    client: AgentsClient, receiver: WebhookReceiver, route: str, count: int
) -> list[str]:
    type_name = await dispatched_type(client, receiver, route)
    return [await client.spawn(type_name, f"e-{i}") for i in range(count)]


async def measured_rounds(config: AgentsBenchConfig, entities: list[str], one_round: Round) -> int:
    """Warm every entity up, then measure until the iteration count or the deadline."""
    for url in entities:
        await one_round(url, False)
    deadline = time.monotonic() + config.latency_deadline_s
    done = 0
    while done < config.latency_iterations and time.monotonic() < deadline:
        await one_round(entities[done % len(entities)], True)
        done += 1
    return done


async def await_wake(receiver: WebhookReceiver, url: str, outcome: asyncio.Future[float]) -> float:
    try:
        return await asyncio.wait_for(outcome, WAKE_TIMEOUT_S)
    except BaseException:
        receiver.forget(url)
        raise


async def webhook_arrival(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    arrival_ms: list[float] = []
    send_ms: list[float] = []
    missed = 0
    async with session(0) as http:
        client = AgentsClient(server.base_url, http)
        receiver = await WebhookReceiver(client).start()
        try:
            entities = await _dispatched_entities(
                client, receiver, DONE_ROUTE, config.latency_entities
            )

            async def one_round(url: str, measured: bool) -> None:
                nonlocal missed
                expectation = receiver.expect(url, time.perf_counter())
                await client.send(url, SEND_PAYLOAD)
                sent = time.perf_counter()
                try:
                    arrived = await await_wake(receiver, url, expectation.arrived)
                except TimeoutError:
                    missed += 1
                    if missed >= MAX_FAILURES:
                        raise ProtocolError(f"{missed} wakes never arrived") from None
                    return
                if measured:
                    arrival_ms.append((arrived - expectation.sent_at) * 1000)
                    send_ms.append((sent - expectation.sent_at) * 1000)

            rounds = await measured_rounds(config, entities, one_round)
        finally:
            await receiver.close()
    arrival = summarize_ms(arrival_ms)
    send = summarize_ms(send_ms)
    out.add(ARRIVAL_SECTION, "arrival p50", "ms", arrival["p50"], "lower")
    out.add(ARRIVAL_SECTION, "arrival p90", "ms", arrival["p90"], "lower")
    out.add(ARRIVAL_SECTION, "arrival p99", "ms", arrival["p99"], "lower")
    out.add(ARRIVAL_SECTION, "send RTT p50 (for context)", "ms", send["p50"])
    out.add(ARRIVAL_SECTION, "measured sends", "count", len(arrival_ms))
    out.add(ARRIVAL_SECTION, "missed wakes", "count", missed, "lower")
    out.raw = {
        "rounds": rounds,
        "entities": len(entities),
        "arrival_ms": arrival,
        "send_rtt_ms": send,
        "missed": missed,
        "unexpected_wakes": receiver.unexpected_wakes,
    }
    return out


async def full_cycle(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    cycle_ms: list[float] = []
    arrival_ms: list[float] = []
    steps_ms: dict[str, list[float]] = {"claim": [], "write": [], "done": []}
    failures: list[str] = []
    async with session(0) as http:
        client = AgentsClient(server.base_url, http)
        receiver = await WebhookReceiver(client).start()
        try:
            entities = await _dispatched_entities(
                client, receiver, CYCLE_ROUTE, config.latency_entities
            )

            async def one_round(url: str, measured: bool) -> None:
                expectation: Expectation = receiver.expect(url, time.perf_counter())
                await client.send(url, SEND_PAYLOAD)
                try:
                    finished = await await_wake(receiver, url, expectation.finished)
                    # The handler's own write wakes it once more; let that end first.
                    await await_wake(receiver, url, expectation.settled)
                except (TimeoutError, ProtocolError, aiohttp.ClientError) as exc:
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
                    if len(failures) >= MAX_FAILURES:
                        message = f"{len(failures)} cycles failed, first: {failures[0]}"
                        raise ProtocolError(message) from None
                    return
                if measured:
                    cycle_ms.append((finished - expectation.sent_at) * 1000)
                    arrival_ms.append((expectation.arrived.result() - expectation.sent_at) * 1000)
                    for step, value in expectation.steps_ms.items():
                        steps_ms[step].append(value)

            rounds = await measured_rounds(config, entities, one_round)
            idle = await count_idle(client, entities)
        finally:
            await receiver.close()
    cycle = summarize_ms(cycle_ms)
    out.add(CYCLE_SECTION, "send -> done acknowledged p50", "ms", cycle["p50"], "lower")
    out.add(CYCLE_SECTION, "send -> done acknowledged p90", "ms", cycle["p90"], "lower")
    out.add(CYCLE_SECTION, "send -> done acknowledged p99", "ms", cycle["p99"], "lower")
    out.add(CYCLE_SECTION, "of which send -> wake arrival p50", "ms",
            summarize_ms(arrival_ms)["p50"])  # fmt: skip
    for step, values in steps_ms.items():
        out.add(CYCLE_SECTION, f"{step} round trip p50", "ms", summarize_ms(values)["p50"])
    out.add(CYCLE_SECTION, "measured cycles", "count", len(cycle_ms))
    out.add(CYCLE_SECTION, "failed cycles", "count", len(failures), "lower")
    out.add(CYCLE_SECTION, f"entities idle at the end (of {len(entities)})", "count", idle,
            "higher")  # fmt: skip
    out.raw = {
        "rounds": rounds,
        "entities": len(entities),
        "cycle_ms": cycle,
        "arrival_ms": summarize_ms(arrival_ms),
        "steps_ms": {step: summarize_ms(values) for step, values in steps_ms.items()},
        "failures": failures,
        "idle_at_end": idle,
        "unexpected_wakes": receiver.unexpected_wakes,
        "unexpected_wake_failures": receiver.unexpected_failures,
    }
    return out


async def count_idle(client: AgentsClient, entities: list[str]) -> int:
    """How many entities are `idle` once their last done is through (polled, bounded)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        statuses = [await client.entity_status(url) for url in entities]
        idle = statuses.count("idle")
        if idle == len(entities) or time.monotonic() > deadline:
            return idle
        await asyncio.sleep(0.1)

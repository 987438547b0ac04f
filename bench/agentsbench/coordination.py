"""Scenarios 5-6: coordination timing, read the way an entity's reader sees it, through a
live long-poll reader on a stream (live.py).

5. runFinished parent wake (spec/03 §4, spec/02 §3.4 spawn `wake`). Parents of a type
   without a dispatch policy, each followed by a live reader on its main stream from
   before its first child. Each round spawns a child with `parent`, a `runFinished` wake
   for the parent with `includeResponse`, and an initial message; the child's type
   dispatches to the receiver's `/run` route, which claims, writes a run with its text and
   completes it, then reports done (receiver.py). Latency = just before the POST of the
   child's final `run` update -> the parent's reader has the `wake` event. Every wake must
   carry the child's response, and each child must wake its parent exactly once.
6. Cron tick jitter (spec/03 §5.7). An entity's cron schedule fires every second; a live
   reader follows the `/_cron/<base64url>` stream. For each tick, the ideal moment is the
   second boundary its `firedAt` falls in: jitter = `firedAt` - ideal (the scheduler's
   lateness) and arrival at the reader - ideal (what a watcher sees). A tick later than a
   whole second would land in the next second: it shows as a skipped second instead.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import aiohttp

from agentsbench.client import AgentsClient
from agentsbench.config import AgentsBenchConfig
from agentsbench.dispatch import (
    MAX_FAILURES,
    WAKE_TIMEOUT_S,
    await_wake,
    dispatched_type,
    measured_rounds,
)
from agentsbench.live import Arrival, LiveReader, Match
from agentsbench.receiver import RUN_DELTAS, RUN_ROUTE, WebhookReceiver
from agentsbench.throughput import SEND_PAYLOAD, bench_name
from streambench.model import WorkloadResult
from streambench.servers import RunningServer
from streambench.stats import summarize_ms
from streambench.wire import ProtocolError, session

PARENT_WAKE_SECTION = "5. child run completed -> runFinished wake in the parent's stream"
CRON_SECTION = "6. cron tick jitter (every second, live reader on the /_cron stream)"
EVERY_SECOND = "* * * * * *"
CRON_TIMEZONE = "UTC"
CRON_SCHEDULE_ID = "bench-every-second"
CRON_WARMUP_TICKS = 1  # may have fired before the reader was parked
CRON_SLACK_S = 10.0


def _reader_session(config: AgentsBenchConfig) -> aiohttp.ClientSession:
    # Each request is bounded by the server's long-poll timeout, plus slack.
    return session(0, timeout_s=config.long_poll_timeout_ms / 1000 + 10)


# --- 5. runFinished parent wake -------------------------------------------------------------


def _wake_from(child: str) -> Match:
    def match(event: dict[str, Any]) -> bool:
        value = event.get("value")
        return _is_wake(event) and isinstance(value, dict) and value.get("source") == child

    return match


def _is_wake(event: dict[str, Any]) -> bool:
    return event.get("type") == "wake"


def _wrong_response(wake: Arrival, child: str) -> str | None:
    finished = wake.event["value"].get("finished_child")
    expected = {"url": child, "run_status": "completed", "response": "".join(RUN_DELTAS)}
    if not isinstance(finished, dict) or any(finished.get(k) != v for k, v in expected.items()):
        return f"{child}: finished_child {json.dumps(finished)[:200]}"
    return None


async def parent_wake(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    latency_ms: list[float] = []
    child_done_ms: list[float] = []  # for context: run update -> the child's done acknowledged
    failures: list[str] = []
    wrong: list[str] = []
    readers: dict[str, LiveReader] = {}
    async with _reader_session(config) as http:
        client = AgentsClient(server.base_url, http)
        receiver = await WebhookReceiver(client).start()
        try:
            child_type = await dispatched_type(client, receiver, RUN_ROUTE)
            parent_type = bench_name("parent")
            await client.register_type(parent_type)
            parents = [
                await client.spawn(parent_type, f"p-{i}") for i in range(config.latency_entities)
            ]
            for parent in parents:
                readers[parent] = LiveReader(http, f"{client.base_url}{parent}/main").start()
            numbers = itertools.count()

            async def one_round(parent: str, measured: bool) -> None:
                child_id = f"c-{next(numbers)}"
                child = f"/{child_type}/{child_id}"
                wake = {"subscriberUrl": parent, "condition": "runFinished",
                        "includeResponse": True}  # fmt: skip
                body = {"parent": parent, "wake": wake, "initialMessage": SEND_PAYLOAD}
                expectation = receiver.expect(child, time.perf_counter())
                try:
                    spawned = await client.spawn(child_type, child_id, body)
                    if spawned != child:
                        raise ProtocolError(f"spawned {spawned}, expected {child}")
                    woken = await readers[parent].first(_wake_from(child), WAKE_TIMEOUT_S)
                    finished = await await_wake(receiver, child, expectation.finished)
                    # The child's own writes wake it once more; let that end first.
                    await await_wake(receiver, child, expectation.settled)
                except (TimeoutError, ProtocolError, aiohttp.ClientError) as exc:
                    receiver.forget(child)
                    failures.append(f"{child}: {type(exc).__name__}: {exc}")
                    if len(failures) >= MAX_FAILURES:
                        message = f"{len(failures)} rounds failed, first: {failures[0]}"
                        raise ProtocolError(message) from None
                    return
                if (problem := _wrong_response(woken, child)) is not None:
                    wrong.append(problem)
                assert expectation.run_finished_at is not None  # set before the wake could be
                if measured:
                    latency_ms.append((woken.at - expectation.run_finished_at) * 1000)
                    child_done_ms.append((finished - expectation.run_finished_at) * 1000)

            rounds = await measured_rounds(config, parents, one_round)
            # Exactly once: a child's wake appears once in its parent's stream.
            per_child = Counter(
                a.event["value"].get("source")
                for reader in readers.values()
                for a in reader.matching(_is_wake)
            )
        finally:
            for reader in readers.values():
                await reader.close()
            await receiver.close()
    duplicates = sum(n - 1 for n in per_child.values())
    latency = summarize_ms(latency_ms)
    section = PARENT_WAKE_SECTION
    out.add(section, "run update -> parent wake p50", "ms", latency["p50"], "lower")
    out.add(section, "run update -> parent wake p90", "ms", latency["p90"], "lower")
    out.add(section, "run update -> parent wake p99", "ms", latency["p99"], "lower")
    out.add(section, "run update -> child's done acknowledged p50 (for context)", "ms",
            summarize_ms(child_done_ms)["p50"])  # fmt: skip
    out.add(section, "measured children", "count", len(latency_ms))
    out.add(section, "failed rounds", "count", len(failures), "lower")
    out.add(section, "wakes without the child's response", "count", len(wrong), "lower")
    out.add(section, "duplicate wakes", "count", duplicates, "lower")
    out.raw = {
        "rounds": rounds,
        "parents": len(readers),
        "children": len(per_child),
        "latency_ms": latency,
        "child_done_ms": summarize_ms(child_done_ms),
        "failures": failures,
        "wrong_responses": wrong,
        "duplicate_wakes": duplicates,
        "unexpected_wakes": receiver.unexpected_wakes,
        "unexpected_wake_failures": receiver.unexpected_failures,
    }
    return out


# --- 6. cron tick jitter ------------------------------------------------------------------


def cron_stream_url(expression: str, timezone: str) -> str:
    """`/_cron/<base64url(JSON)>` computed client-side, as the runtime does (spec/03 §5.7)."""
    document = json.dumps({"expression": expression, "timezone": timezone}, separators=(",", ":"))
    return "/_cron/" + base64.urlsafe_b64encode(document.encode()).rstrip(b"=").decode()


def _is_tick(event: dict[str, Any]) -> bool:
    return event.get("type") == "cron_tick"


def _fired_ms(arrival: Arrival) -> int:
    """`firedAt` (ISO, milliseconds) in epoch milliseconds."""
    return round(datetime.fromisoformat(arrival.event["value"]["firedAt"]).timestamp() * 1000)


async def cron_jitter(server: RunningServer, config: AgentsBenchConfig) -> WorkloadResult:
    out = WorkloadResult()
    wanted = CRON_WARMUP_TICKS + config.cron_ticks
    cleanup_error: str | None = None
    async with _reader_session(config) as http:
        client = AgentsClient(server.base_url, http)
        owner_type = bench_name("cron")
        await client.register_type(owner_type)
        owner = await client.spawn(owner_type, "owner")
        schedule = {"scheduleType": "cron", "expression": EVERY_SECOND,
                    "timezone": CRON_TIMEZONE, "payload": {"job": "bench"}}  # fmt: skip
        await client.put_schedule(owner, CRON_SCHEDULE_ID, schedule)
        stream = client.base_url + cron_stream_url(EVERY_SECOND, CRON_TIMEZONE)
        reader = LiveReader(http, stream).start()
        try:
            await reader.wait_for(_is_tick, wanted, wanted + CRON_SLACK_S)
        except TimeoutError:
            pass  # reported below as fewer ticks than asked for
        finally:
            await reader.close()
            # Stop the chain (the schedule is its only watcher), so nothing ticks on under
            # the scenarios after this one; a failure here must not hide the first one.
            try:
                await client.delete_schedule(owner, CRON_SCHEDULE_ID)
            except (ProtocolError, aiohttp.ClientError) as exc:
                cleanup_error = f"{type(exc).__name__}: {exc}"
    ticks = reader.matching(_is_tick)
    measured = ticks[CRON_WARMUP_TICKS:wanted]
    if not measured:
        raise ProtocolError(f"{len(ticks)} cron tick(s) in {wanted + CRON_SLACK_S:.0f} s")
    fired_ms: list[float] = []
    arrival_ms: list[float] = []
    seconds: list[int] = []
    for tick in measured:
        fired = _fired_ms(tick)
        ideal = fired // 1000 * 1000
        seconds.append(ideal // 1000)
        fired_ms.append(fired - ideal)
        arrival_ms.append(tick.wall * 1000 - ideal)
    skipped = seconds[-1] - seconds[0] + 1 - len(set(seconds))
    # One due time per second: two ticks in a second, or one tick read twice, is a double.
    keys = {t.event["key"] for t in ticks}
    doubled = len(ticks) - min(len(keys), len({_fired_ms(t) // 1000 for t in ticks}))
    fired_summary = summarize_ms(fired_ms)
    arrival = summarize_ms(arrival_ms)
    for label, summary in (("firedAt", fired_summary), ("arrival at the reader", arrival)):
        for stat in ("p50", "p99", "max"):
            out.add(CRON_SECTION, f"{label} - second boundary {stat}", "ms", summary[stat],
                    "lower")  # fmt: skip
    out.add(CRON_SECTION, f"measured ticks (of {config.cron_ticks})", "count", len(measured),
            "higher")  # fmt: skip
    out.add(CRON_SECTION, "skipped seconds", "count", skipped, "lower")
    out.add(CRON_SECTION, "doubled ticks", "count", doubled, "lower")
    out.raw = {
        "expression": EVERY_SECOND,
        "timezone": CRON_TIMEZONE,
        "ticks_read": len(ticks),
        "measured": len(measured),
        "fired_jitter_ms": fired_summary,
        "arrival_jitter_ms": arrival,
        "skipped_seconds": skipped,
        "doubled_ticks": doubled,
        "fired_at": [t.event["value"]["firedAt"] for t in measured],
        "schedule_delete_error": cleanup_error,
    }
    return out

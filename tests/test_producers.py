"""Idempotent producers under concurrency (spec/01 §A.6): exactly one stored copy of every
accepted seq, zombies fenced with 403, and a model-based property test of the rules."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, create_stream, producer_headers, read_all, unique_name

TEXT = {"Content-Type": "text/plain"}
RETRY_LIMIT = 2000


@dataclass
class Outcome:
    seq: int
    statuses: list[int]
    final: httpx.Response


async def send_until_settled(
    http: httpx.AsyncClient, url: str, producer: str, epoch: int, seq: int, body: bytes
) -> Outcome:
    """Send one producer request, retrying while it is ahead of the accepted seq (409 gap),
    as a pipelining client does. Settles on 200 (accepted) or 204 (duplicate)."""
    statuses: list[int] = []
    for _ in range(RETRY_LIMIT):
        response = await http.post(
            url, content=body, headers={**TEXT, **producer_headers(producer, epoch, seq)}
        )
        statuses.append(response.status_code)
        if response.status_code in (200, 204):
            return Outcome(seq, statuses, response)
        assert response.status_code == 409, (response.status_code, response.text)
        assert int(response.headers["Producer-Expected-Seq"]) < seq
        assert response.headers["Producer-Received-Seq"] == str(seq)
        await asyncio.sleep(0.005)
    raise AssertionError(f"seq {seq} never settled: {statuses[-5:]}")


@pytest.mark.timeout(120)
async def test_concurrent_duplicates_and_gaps_store_each_accepted_seq_exactly_once(
    shared_server: ServerProcess,
) -> None:
    seqs, copies = 40, 3
    url = shared_server.url(unique_name("dupes"))
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        assert (await http.put(url, headers=TEXT)).status_code == 201
        senders = [
            send_until_settled(http, url, "p", 0, seq, f"<{seq}>".encode())
            for _ in range(copies)
            for seq in range(seqs)
        ]
        # Requests far past the end stay gaps however the race goes.
        gaps = [
            http.post(url, content=b"gap", headers={**TEXT, **producer_headers("p", 0, seq)})
            for seq in range(seqs + 5, seqs + 15)
        ]
        results = await asyncio.gather(*senders, *gaps)
        outcomes = [r for r in results if isinstance(r, Outcome)]
        gap_responses = [r for r in results if isinstance(r, httpx.Response)]

        for gap in gap_responses:
            assert gap.status_code == 409, (gap.status_code, gap.text)
            assert int(gap.headers["Producer-Expected-Seq"]) <= seqs
        accepted: dict[int, httpx.Response] = {}
        for outcome in outcomes:
            if outcome.final.status_code == 200:
                assert outcome.seq not in accepted, f"seq {outcome.seq} accepted twice"
                accepted[outcome.seq] = outcome.final
                assert outcome.final.headers["Producer-Seq"] == str(outcome.seq)
            else:
                assert int(outcome.final.headers["Producer-Seq"]) >= outcome.seq
        assert sorted(accepted) == list(range(seqs))
        offsets = [accepted[seq].headers["Stream-Next-Offset"] for seq in range(seqs)]
        assert offsets == sorted(offsets) and len(set(offsets)) == seqs

        content = (await http.get(url)).content
        assert content == b"".join(f"<{seq}>".encode() for seq in range(seqs))
        duplicate = await http.post(
            url, content=b"again", headers={**TEXT, **producer_headers("p", 0, 0)}
        )
        assert duplicate.status_code == 204
        assert duplicate.headers["Producer-Seq"] == str(seqs - 1)
        assert duplicate.headers["Stream-Next-Offset"] == offsets[-1]


@pytest.mark.timeout(120)
async def test_zombie_with_an_old_epoch_is_fenced_after_a_bump(
    shared_server: ServerProcess,
) -> None:
    url = shared_server.url(unique_name("zombie"))
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.put(url, headers=TEXT)).status_code == 201
        for seq in range(3):
            old = await http.post(
                url,
                content=f"old{seq};".encode(),
                headers={**TEXT, **producer_headers("p", 0, seq)},
            )
            assert old.status_code == 200
        bump = await http.post(
            url, content=b"new0;", headers={**TEXT, **producer_headers("p", 1, 0)}
        )
        assert bump.status_code == 200
        assert bump.headers["Producer-Epoch"] == "1"

        async def new_writer() -> list[int]:
            statuses = []
            for seq in range(1, 11):
                response = await http.post(
                    url,
                    content=f"new{seq};".encode(),
                    headers={**TEXT, **producer_headers("p", 1, seq)},
                )
                statuses.append(response.status_code)
            return statuses

        zombies = [
            http.post(url, content=b"zombie;", headers={**TEXT, **producer_headers("p", 0, seq)})
            for seq in [*range(0, 12), 2, 3, 3]
        ]
        new_statuses, *zombie_responses = await asyncio.gather(new_writer(), *zombies)
        assert new_statuses == [200] * 10
        for zombie in zombie_responses:
            assert zombie.status_code == 403, (zombie.status_code, zombie.text)
            assert zombie.headers["Producer-Epoch"] == "1"
            assert zombie.json()["error"]["code"]
        content = (await http.get(url)).content
        expected = b"old0;old1;old2;" + b"".join(f"new{s};".encode() for s in range(11))
        assert content == expected


@pytest.mark.timeout(120)
async def test_concurrent_epoch_bumps_leave_the_highest_epoch_in_charge(
    shared_server: ServerProcess,
) -> None:
    url = shared_server.url(unique_name("bumps"))
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.put(url, headers=TEXT)).status_code == 201
        ok = await http.post(url, content=b"e0;", headers={**TEXT, **producer_headers("p", 0, 0)})
        assert ok.status_code == 200
        epochs = list(range(1, 9))
        responses = await asyncio.gather(
            *(
                http.post(
                    url, content=f"e{e};".encode(), headers={**TEXT, **producer_headers("p", e, 0)}
                )
                for e in epochs
            )
        )
        accepted = []
        for epoch, response in zip(epochs, responses, strict=True):
            assert response.status_code in (200, 403), (epoch, response.status_code)
            if response.status_code == 200:
                accepted.append((response.headers["Stream-Next-Offset"], epoch))
            else:
                assert int(response.headers["Producer-Epoch"]) > epoch
        assert (responses[-1].status_code, max(epochs)) == (200, 8)
        # Stored in offset order, the accepted epochs only ever go up.
        accepted.sort()
        assert [e for _, e in accepted] == sorted(e for _, e in accepted)
        content = (await http.get(url)).content.decode()
        assert content == "e0;" + "".join(f"e{e};" for _, e in accepted)
        stale = await http.post(url, content=b"x", headers={**TEXT, **producer_headers("p", 7, 1)})
        assert stale.status_code == 403
        assert stale.headers["Producer-Epoch"] == "8"
        nxt = await http.post(url, content=b"e8b;", headers={**TEXT, **producer_headers("p", 8, 1)})
        assert nxt.status_code == 200


# --- model-based property test ------------------------------------------------------------


@dataclass
class ProducerModel:
    """The §A.6 rules, for one (stream, producer)."""

    epoch: int | None = None
    last_seq: int = -1

    def expect(self, epoch: int, seq: int) -> int:
        if self.epoch is None:
            return 200 if seq == 0 else 409
        if epoch < self.epoch:
            return 403
        if epoch > self.epoch:
            return 200 if seq == 0 else 400
        if seq <= self.last_seq:
            return 204
        return 200 if seq == self.last_seq + 1 else 409

    def accept(self, epoch: int, seq: int) -> None:
        self.epoch, self.last_seq = epoch, seq


operations = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]), st.integers(min_value=0, max_value=3), st.integers(0, 5)
    ),
    min_size=1,
    max_size=30,
)


@pytest.mark.timeout(240)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=operations)
def test_producer_dedupe_and_offsets_follow_the_model(
    ops: list[tuple[str, int, int]], shared_server: ServerProcess, client: httpx.Client
) -> None:
    url = shared_server.url(unique_name("model"))
    create_stream(client, url)
    models = {"a": ProducerModel(), "b": ProducerModel()}
    stored: list[bytes] = []
    tail = client.head(url).headers["Stream-Next-Offset"]
    for index, (producer, epoch, seq) in enumerate(ops):
        model = models[producer]
        expected = model.expect(epoch, seq)
        body = f"{index}:{producer}{epoch}.{seq};".encode()
        response = client.post(
            url, content=body, headers={**TEXT, **producer_headers(producer, epoch, seq)}
        )
        context = (index, producer, epoch, seq, response.status_code, response.text)
        assert response.status_code == expected, context
        if expected == 200:
            model.accept(epoch, seq)
            stored.append(body)
            offset = response.headers["Stream-Next-Offset"]
            assert offset > tail, context
            tail = offset
            assert response.headers["Producer-Seq"] == str(seq)
            assert response.headers["Producer-Epoch"] == str(epoch)
        elif expected == 204:
            assert response.headers["Stream-Next-Offset"] == tail, context
            assert response.headers["Producer-Seq"] == str(model.last_seq), context
        elif expected == 403:
            assert response.headers["Producer-Epoch"] == str(model.epoch), context
        elif expected == 409:
            wanted = 0 if model.epoch is None else model.last_seq + 1
            assert response.headers["Producer-Expected-Seq"] == str(wanted), context
            assert response.headers["Producer-Received-Seq"] == str(seq), context
    content, final = read_all(client, url)
    assert content == b"".join(stored)
    assert final == tail

"""Idempotent-producer rules (spec/01 §A.6), as a pure function over stored state.

State is kept per (stream, producer id) as (epoch, last accepted seq). The caller runs this
inside the append's transaction, with the stream row locked, so checks are serialized.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from electric_agents.errors import ApiError

MAX_SAFE_INTEGER = (1 << 53) - 1
MAX_PRODUCER_ID_LENGTH = 256


@dataclass(frozen=True)
class ProducerHeaders:
    producer_id: str
    epoch: int
    seq: int


class ProducerOutcome(Enum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ProducerState:
    epoch: int
    last_seq: int


def parse_producer_headers(
    producer_id: str | None, epoch: str | None, seq: str | None
) -> ProducerHeaders | None:
    """Validate the three producer headers: all or none, id non-empty, integers in range."""
    given = [value is not None for value in (producer_id, epoch, seq)]
    if not any(given):
        return None
    if not all(given):
        raise ApiError(
            400,
            "INVALID_PRODUCER",
            "Producer-Id, Producer-Epoch and Producer-Seq must be sent together",
        )
    assert producer_id is not None and epoch is not None and seq is not None
    if producer_id == "":
        raise ApiError(400, "INVALID_PRODUCER", "Producer-Id must not be empty")
    if len(producer_id) > MAX_PRODUCER_ID_LENGTH:
        raise ApiError(
            400,
            "INVALID_PRODUCER",
            f"Producer-Id is longer than {MAX_PRODUCER_ID_LENGTH} characters",
        )
    numbers = []
    for name, raw in (("Producer-Epoch", epoch), ("Producer-Seq", seq)):
        in_range = raw.isascii() and raw.isdigit() and len(raw) <= 16
        if not in_range or int(raw) > MAX_SAFE_INTEGER:
            raise ApiError(400, "INVALID_PRODUCER", f"{name} must be a non-negative integer")
        numbers.append(int(raw))
    return ProducerHeaders(producer_id, numbers[0], numbers[1])


def check_producer(
    headers: ProducerHeaders, state: ProducerState | None
) -> tuple[ProducerOutcome, ProducerState]:
    """Decide accept or duplicate, or raise the protocol's 400/403/409.

    Returns the outcome and the state to store if the append then succeeds.
    """
    epoch, seq = headers.epoch, headers.seq
    if state is None:
        if seq != 0:
            raise _sequence_gap(expected=0, received=seq)
        return ProducerOutcome.ACCEPT, ProducerState(epoch, 0)
    if epoch < state.epoch:
        raise ApiError(
            403,
            "PRODUCER_FENCED",
            "Producer epoch is stale",
            headers={"Producer-Epoch": str(state.epoch)},
        )
    if epoch > state.epoch:
        if seq != 0:
            raise ApiError(400, "INVALID_PRODUCER", "A new producer epoch must start at seq 0")
        return ProducerOutcome.ACCEPT, ProducerState(epoch, 0)
    if seq <= state.last_seq:
        return ProducerOutcome.DUPLICATE, state
    if seq == state.last_seq + 1:
        return ProducerOutcome.ACCEPT, ProducerState(epoch, seq)
    raise _sequence_gap(expected=state.last_seq + 1, received=seq)


def _sequence_gap(*, expected: int, received: int) -> ApiError:
    return ApiError(
        409,
        "PRODUCER_SEQ_GAP",
        "Producer sequence gap",
        headers={"Producer-Expected-Seq": str(expected), "Producer-Received-Seq": str(received)},
    )

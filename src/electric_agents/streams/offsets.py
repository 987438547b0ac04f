"""Offsets and live-read cursors (spec/01 §A.3, §A.12).

An offset is `RRRRRRRRRRRRRRRR_BBBBBBBBBBBBBBBB` like the reference: a read sequence (always 0
here) and a byte position. A message's offset is the position after it; each message
advances the position by its stored length + 5, as the reference's file format does.
"""

from __future__ import annotations

import math
import random
import re
import time

from electric_agents.errors import ApiError

ZERO_OFFSET = "0000000000000000_0000000000000000"
MESSAGE_OVERHEAD = 5
# Larger than any real position: the upper bound of a stream's own segment in a read.
OFFSET_INFINITY = 1 << 62

_OFFSET_RE = re.compile(r"([0-9]{1,19})_([0-9]{1,19})")
_CURSOR_EPOCH_S = 1728432000  # 2024-10-09T00:00:00Z
_CURSOR_INTERVAL_S = 20


def format_offset(position: int) -> str:
    return f"0000000000000000_{position:016d}"


def parse_offset(token: str) -> int | None:
    """The byte position of a well-formed offset token, or None if it is malformed."""
    match = _OFFSET_RE.fullmatch(token)
    if match is None:
        return None
    position = int(match.group(2))
    return position if position < OFFSET_INFINITY else None


def parse_read_offset(values: list[str] | None) -> int | str | None:
    """The `offset` query parameter of a GET: None (absent), "now", -1, or a position.

    A repeated, empty or malformed value is a 400 (spec/01 §A.3).
    """
    if values is None:
        return None
    if len(values) != 1:
        raise ApiError(400, "INVALID_OFFSET", "offset must be given once")
    token = values[0]
    if token == "-1":
        return -1
    if token == "now":
        return "now"
    position = parse_offset(token)
    if position is None:
        raise ApiError(400, "INVALID_OFFSET", "Invalid offset")
    return position


def next_cursor(client_cursor: str | None) -> str:
    """A cursor strictly greater than the client's, for CDN request collapsing."""
    interval = int((time.time() - _CURSOR_EPOCH_S) // _CURSOR_INTERVAL_S)
    if client_cursor and client_cursor.isdigit():
        current = int(client_cursor)
        if current >= interval:
            jitter_s = random.randint(1, 3600)
            return str(current + max(1, math.ceil(jitter_s / _CURSOR_INTERVAL_S)))
    return str(interval)

"""Recently read message ranges, kept in memory so that many readers catching up on the same
stream cost one query (the same role a CDN plays in front of the reference server).

Each range also keeps its encoded response body (the bytes a catch-up GET sends), so a
popular range is joined once, not once per reader.

A range of a stream never changes once written, so an entry keyed by (stream id, start,
end) is valid for as long as it is kept: a deleted and re-created path gets a new stream
id, and expiry is checked on the stream row before any read. Bounded by bytes, LRU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from electric_agents.streams.model import Message

DEFAULT_CAPACITY_BYTES = 64 * 1024 * 1024
# Ranges smaller than this are cheap to query again; keeping them would only churn the cache.
MIN_CACHED_BYTES = 16 * 1024


@dataclass(frozen=True)
class CachedRange:
    messages: list[Message]
    body: bytes  # the messages encoded as a read's response body
    size: int  # bytes held: the messages and the body


class ReadCache:
    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        self._capacity = capacity_bytes
        self._size = 0
        self._ranges: OrderedDict[tuple[int, int, int], CachedRange] = OrderedDict()

    def get(self, stream_id: int, after: int, upto: int) -> CachedRange | None:
        key = (stream_id, after, upto)
        entry = self._ranges.get(key)
        if entry is None:
            return None
        self._ranges.move_to_end(key)
        return entry

    def put(
        self, stream_id: int, after: int, upto: int, messages: list[Message], body: bytes
    ) -> None:
        size = sum(len(m.data) for m in messages) + len(body)
        if size < MIN_CACHED_BYTES or size > self._capacity // 4:
            return
        key = (stream_id, after, upto)
        if key in self._ranges:
            return
        self._ranges[key] = CachedRange(messages, body, size)
        self._size += size
        while self._size > self._capacity:
            _, dropped = self._ranges.popitem(last=False)
            self._size -= dropped.size

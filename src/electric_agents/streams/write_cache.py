"""What the append writer last knew of the streams it writes, so a batch can be checked in
memory and committed in one round trip (`_APPEND_BATCH` in writer.py).

The database stays the authority: the commit verifies each stream's tail and closed state
still match, and on any difference the entries are dropped and the batch takes the locking
path. Producer state only changes together with a stream's tail or closed state, so that
check covers it too. Only streams that cannot expire (no TTL, no deadline) are kept, and the
cache is bounded, so idle streams cost nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from electric_agents.streams.model import Presence, StreamMeta
from electric_agents.streams.producers import ProducerState

MAX_CACHED_STREAMS = 10_000
MAX_PRODUCERS_PER_STREAM = 1_000


@dataclass
class CachedStream:
    meta: StreamMeta
    # Producer id -> state; None records "no state stored yet".
    producers: dict[str, ProducerState | None] = field(default_factory=dict)


class WriteCache:
    def __init__(self) -> None:
        self._streams: OrderedDict[str, CachedStream] = OrderedDict()

    @staticmethod
    def cacheable(meta: StreamMeta) -> bool:
        return (
            meta.presence is Presence.LIVE and meta.ttl_seconds is None and meta.expires_at is None
        )

    def get(self, path: str) -> CachedStream | None:
        entry = self._streams.get(path)
        if entry is not None:
            self._streams.move_to_end(path)
        return entry

    def put_fresh(self, meta: StreamMeta) -> CachedStream | None:
        """Remember a stream just read from the database (its producers are read on use)."""
        if not self.cacheable(meta):
            self.forget(meta.path)
            return None
        entry = self._streams[meta.path] = CachedStream(meta)
        self._streams.move_to_end(meta.path)
        while len(self._streams) > MAX_CACHED_STREAMS:
            self._streams.popitem(last=False)
        return entry

    def remember_producer(
        self, entry: CachedStream, producer_id: str, state: ProducerState | None
    ) -> None:
        if len(entry.producers) >= MAX_PRODUCERS_PER_STREAM:
            entry.producers.clear()
        entry.producers[producer_id] = state

    def forget(self, path: str) -> None:
        self._streams.pop(path, None)

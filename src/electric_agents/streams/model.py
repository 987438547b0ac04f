"""Plain values the stream engine passes around."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from electric_agents.streams.offsets import OFFSET_INFINITY

JSON_MEDIA_TYPE = "application/json"
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def media_type(content_type: str | None) -> str:
    """The normalized media type: before `;`, trimmed, lower-cased (spec/01 §A.4)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def is_valid_content_type(content_type: str | None) -> bool:
    kind = media_type(content_type)
    if kind.count("/") != 1:
        return False
    major, minor = kind.split("/")
    return bool(major) and bool(minor) and " " not in kind


def is_json_type(content_type: str) -> bool:
    return media_type(content_type) == JSON_MEDIA_TYPE


def is_text_like(content_type: str) -> bool:
    """Text and JSON streams go over SSE as is; everything else as base64 (spec/01 §A.15)."""
    kind = media_type(content_type)
    return kind.startswith("text/") or kind == JSON_MEDIA_TYPE


class Presence(Enum):
    LIVE = "live"
    MISSING = "missing"  # never existed, deleted, or expired without forks
    GONE = "gone"  # soft-deleted, or expired while forks still read it (410)


@dataclass(frozen=True)
class StreamMeta:
    id: int
    path: str
    content_type: str
    ttl_seconds: int | None
    expires_at: str | None
    tail: int
    closed: bool
    closed_by_producer: str | None
    closed_by_epoch: int | None
    closed_by_seq: int | None
    last_stream_seq: str | None
    forked_from_path: str | None
    fork_offset: int | None
    fork_sub_offset: int
    lineage_ids: list[int]
    lineage_bounds: list[int]
    ref_count: int
    soft_deleted: bool
    expired: bool

    @classmethod
    def from_row(cls, row: Any) -> StreamMeta:
        return cls(
            id=row["id"],
            path=row["path"],
            content_type=row["content_type"],
            ttl_seconds=row["ttl_seconds"],
            expires_at=row["expires_at"],
            tail=row["tail"],
            closed=row["closed"],
            closed_by_producer=row["closed_by_producer"],
            closed_by_epoch=row["closed_by_epoch"],
            closed_by_seq=row["closed_by_seq"],
            last_stream_seq=row["last_stream_seq"],
            forked_from_path=row["forked_from_path"],
            fork_offset=row["fork_offset"],
            fork_sub_offset=row["fork_sub_offset"],
            lineage_ids=list(row["lineage_ids"]),
            lineage_bounds=list(row["lineage_bounds"]),
            ref_count=row["ref_count"],
            soft_deleted=row["soft_deleted"],
            expired=row["expired"],
        )

    @property
    def presence(self) -> Presence:
        if self.soft_deleted:
            return Presence.GONE
        if self.expired:
            return Presence.GONE if self.ref_count > 0 else Presence.MISSING
        return Presence.LIVE

    @property
    def is_json(self) -> bool:
        return is_json_type(self.content_type)

    @property
    def is_fork(self) -> bool:
        return bool(self.lineage_ids)

    def read_segments(self) -> tuple[list[int], list[int]]:
        """(stream ids, highest offset each contributes) for reading through a fork chain."""
        return [*self.lineage_ids, self.id], [*self.lineage_bounds, OFFSET_INFINITY]


@dataclass(frozen=True)
class Message:
    """One stored message: its offset (end position) and its bytes.

    For JSON streams the bytes are the POST's flattened values joined by commas, so a read
    returns `[` + messages joined by `,` + `]`.
    """

    offset: int
    data: bytes

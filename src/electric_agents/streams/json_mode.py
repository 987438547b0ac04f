"""JSON mode (spec/01 §A.14) and State Protocol offset stamping (§A.21).

A POST body is parsed once; a top-level array is flattened one level into separate values.
Values are re-serialized compactly and stored as one message (`v1,v2,...`) under one offset.
State Protocol messages (objects whose `headers` holds a string `operation` or `control`)
get `headers.offset` set to their message's offset, at write time, so reads never re-parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from electric_agents.errors import ApiError
from electric_agents.streams.offsets import format_offset


@dataclass(frozen=True)
class JsonBatch:
    """The values of one POST: pre-serialized bytes, or objects awaiting their offset."""

    values: list[bytes | dict[str, Any]]
    # The length this batch advances the stream position by. Offsets are opaque, so the
    # request body's length serves, and it does not depend on the stamped offsets.
    size: int

    @property
    def count(self) -> int:
        return len(self.values)

    def encode(self, offset: int) -> bytes:
        """The stored message for this batch, with state messages stamped at `offset`."""
        token = format_offset(offset)
        parts = []
        for value in self.values:
            if isinstance(value, bytes):
                parts.append(value)
            else:
                value["headers"]["offset"] = token
                parts.append(orjson.dumps(value))
        return b",".join(parts)


def _is_state_message(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    headers = value.get("headers")
    return isinstance(headers, dict) and (
        isinstance(headers.get("operation"), str) or isinstance(headers.get("control"), str)
    )


def parse_json_body(body: bytes, *, allow_empty_array: bool) -> JsonBatch:
    """Parse and flatten a JSON-mode body; a 400 for invalid JSON or (on POST) `[]`."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "Request body is not valid JSON") from None
    items = document if isinstance(document, list) else [document]
    if not items and not allow_empty_array:
        raise ApiError(400, "EMPTY_JSON_ARRAY", "An empty JSON array cannot be appended")
    values: list[bytes | dict[str, Any]] = [
        item if _is_state_message(item) else orjson.dumps(item) for item in items
    ]
    return JsonBatch(values, len(body))


def split_stored_values(data: bytes) -> list[Any]:
    """The values of a stored JSON message, for fork sub-offsets."""
    parsed: list[Any] = orjson.loads(b"[" + data + b"]")
    return parsed


def batch_from_values(values: list[Any]) -> JsonBatch:
    encoded: list[bytes | dict[str, Any]] = [
        v if _is_state_message(v) else orjson.dumps(v) for v in values
    ]
    return JsonBatch(encoded, len(orjson.dumps(values)))

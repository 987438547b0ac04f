"""jsonb columns as asyncpg passes them (text): encode on the way in, decode on the way out.

SQL NULL stands for "not set", so `{}` (present but empty) stays distinct from absent, which
the reference's JavaScript truthiness rules depend on (spec/02 §7.4)."""

from __future__ import annotations

from typing import Any

import orjson


def to_jsonb(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def from_jsonb(value: Any) -> Any:
    if value is None or not isinstance(value, str | bytes):
        return value
    return orjson.loads(value)

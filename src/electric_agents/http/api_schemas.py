"""JSON Schema fragments shared by several control-plane request bodies."""

from __future__ import annotations

from typing import Any

# Integer columns hold these; a larger value is a 400, not a database error.
MAX_INT32 = 2**31 - 1

MILLISECONDS_SCHEMA: dict[str, Any] = {"type": "number", "maximum": MAX_INT32}

# A wake condition (spec/03 §4.1): `"runFinished"` or a `change` filter.
WAKE_CONDITION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"const": "runFinished"},
        {
            "type": "object",
            "properties": {
                "on": {"const": "change"},
                "collections": {"type": "array", "items": {"type": "string"}},
                "ops": {"type": "array", "items": {"enum": ["insert", "update", "delete"]}},
            },
            "required": ["on"],
        },
    ]
}

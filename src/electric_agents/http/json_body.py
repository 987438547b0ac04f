"""Request bodies of the control plane (spec/02 §2.4): read as JSON whatever the content
type, empty means `{}`, and checked against the route's API schema with every error listed."""

from __future__ import annotations

from typing import Any

import orjson

from electric_agents.agents.schemas import validation_errors
from electric_agents.errors import ApiError


def parse_json_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_REQUEST", "Invalid JSON body") from None


def validated_body(body: bytes, schema: dict[str, Any]) -> Any:
    """The parsed body, or a 400 listing every mismatch as `{path, message}` (the same
    Ajv-worded details as user schemas get)."""
    document = parse_json_body(body)
    details = validation_errors(schema, document)
    if details:
        raise ApiError(
            400, "INVALID_REQUEST", "Request body does not match API schema", details=details
        )
    return document

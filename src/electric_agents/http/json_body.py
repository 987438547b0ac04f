"""Request bodies of the control plane (spec/02 §2.4): read as JSON whatever the content
type, empty means `{}`, and checked against the route's API schema with every error listed."""

from __future__ import annotations

from typing import Any

import orjson
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

from electric_agents.errors import ApiError

_VALIDATORS: dict[int, Draft7Validator] = {}


def parse_json_body(body: bytes) -> Any:
    if not body.strip():
        return {}
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_REQUEST", "Invalid JSON body") from None


def validated_body(body: bytes, schema: dict[str, Any]) -> Any:
    """The parsed body, or a 400 listing every mismatch as `{path, message}`."""
    document = parse_json_body(body)
    validator = _VALIDATORS.get(id(schema))
    if validator is None:
        validator = _VALIDATORS[id(schema)] = Draft7Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            "Request body does not match API schema",
            details=[_detail(error) for error in errors],
        )
    return document


def _detail(error: ValidationError) -> dict[str, str]:
    pointer = "".join(f"/{part}" for part in error.absolute_path) or "/"
    return {"path": pointer, "message": _ajv_message(error)}


def _ajv_message(error: ValidationError) -> str:
    """Ajv's English wording for the common keywords; clients match codes, not these."""
    keyword = error.validator
    if keyword == "type":
        expected = error.validator_value
        names = expected if isinstance(expected, list) else [expected]
        return f"must be {','.join(names)}"
    if keyword == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return f"must have required property '{missing}'"
    if keyword == "additionalProperties":
        return "must NOT have additional properties"
    if keyword == "minLength":
        return f"must NOT have fewer than {error.validator_value} characters"
    if keyword == "const":
        return "must be equal to constant"
    if keyword == "enum":
        return "must be equal to one of the allowed values"
    if keyword == "anyOf":
        return "must match a schema in anyOf"
    if keyword == "minimum":
        return f"must be >= {error.validator_value}"
    return error.message

"""User JSON Schemas (entity-type creation/inbox/state schemas): checked once when registered,
compiled once per distinct schema, and used to validate spawn args, sends and stream writes.

The reference compiles with Ajv 8 (draft-07 by default, strict, no formats), so a schema
using `format` or a 2020-12 `$schema` registers fine and then fails with a 500 on first use
(spec/02 §9.3). Here every schema is compiled when it is checked; a schema that cannot be
compiled is a 400 at registration, and validation never raises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache, lru_cache
from typing import Any

import orjson
import regex
from jsonschema import (
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
    FormatChecker,
    validators,
)
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import specification_with

from electric_agents.errors import ApiError

# spec/02 §3.3: the keyword subset a registered schema may use.
ALLOWED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "items",
        "minItems",
        "maxItems",
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "format",
        "title",
        "description",
        "default",
        "additionalProperties",
        "nullable",
        "$schema",
        "$id",
        "$defs",
        "definitions",
    }
)

# Ajv's default class is draft-07, so a schema without `$schema` is read as draft-07; zod
# emits draft-07 or 2020-12, pydantic emits no `$schema` (its output is valid under both).
_DEFAULT_DIALECT = Draft7Validator
_DIALECTS: dict[str, type[Validator]] = {
    "json-schema.org/draft-04/schema": Draft4Validator,
    "json-schema.org/draft-06/schema": Draft6Validator,
    "json-schema.org/draft-07/schema": Draft7Validator,
    "json-schema.org/draft/2019-09/schema": Draft201909Validator,
    "json-schema.org/draft/2020-12/schema": Draft202012Validator,
}

_COMPILED_CACHE_SIZE = 2048

# Deep enough for any generated schema; keeps every stored schema well inside orjson's
# 255-level limit when it is written back inside a response.
MAX_SCHEMA_DEPTH = 100


@lru_cache(maxsize=_COMPILED_CACHE_SIZE)
def _ecma_pattern(pattern: str) -> regex.Pattern[str]:
    """Schema patterns are JavaScript regexes (Ajv compiles them with the `u` flag): zod emits
    `\\p{...}` classes and `(?<name>...)` groups that `re` rejects and `regex` accepts."""
    return regex.compile(pattern)


def _format_checker() -> FormatChecker:
    """The 2020-12 formats (incl. uuid, duration) for every dialect, as ajv-formats would do.
    Formats it does not know are annotations, as 2020-12 defines them (pydantic and zod emit
    many, e.g. "password", "binary", "cuid")."""
    checker = FormatChecker(Draft202012Validator.FORMAT_CHECKER.checkers)
    checker.checks("regex", raises=regex.error)(_is_ecma_regex)
    return checker


def _is_ecma_regex(instance: Any) -> bool:
    if isinstance(instance, str):
        _ecma_pattern(instance)
    return True


_FORMAT_CHECKER = _format_checker()


def validation_errors(schema: dict[str, Any], value: Any) -> list[dict[str, str]]:
    """`[]` when `value` satisfies `schema`, else every failure as Ajv reports it
    (`{"path": <instance JSON pointer or "/">, "message": <Ajv wording>}`)."""
    try:
        validator = _compiled(_canonical_json(schema))
    except (ValueError, TypeError, RecursionError) as error:
        # Only reachable for a schema that skipped check_schema (e.g. an old snapshot): a
        # broken schema rejects the value rather than crashing the request.
        return [{"path": "/", "message": f"schema is invalid: {_first_line(error)}"}]
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: _ajv_order(validator.schema, e))
    except Unresolvable as error:
        return [{"path": "/", "message": f"can't resolve reference: {error}"}]
    except RecursionError:
        return [{"path": "/", "message": "value or schema is nested too deeply"}]
    return [_detail(error) for error in errors]


def check_schema(schema: Any, *, where: str) -> None:
    """Raise a 400 unless `schema` is usable: an object, only allowed keywords, a known
    `$schema`, valid against its dialect's meta-schema, every `$ref` resolvable.

    `where` names the schema in messages (e.g. `creation_schema`, `inbox_schemas.ping`)."""
    if not isinstance(schema, dict):
        raise ApiError(400, "INVALID_REQUEST", f"{where} must be a JSON Schema object")
    if _nested_deeper_than(schema, MAX_SCHEMA_DEPTH):
        raise ApiError(
            400, "INVALID_REQUEST", f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep"
        )
    disallowed = disallowed_keywords(schema)
    problems = [] if disallowed else _compile_problems(schema)
    if disallowed:
        raise ApiError(
            400, "INVALID_REQUEST", "Schema uses disallowed keywords", details=disallowed
        )
    if problems:
        raise ApiError(
            400, "INVALID_REQUEST", f"{where} is not a valid JSON Schema", details=problems
        )


def disallowed_keywords(schema: dict[str, Any], path: str = "") -> list[dict[str, str]]:
    """Keywords outside the allowed subset, walked exactly where the reference walks:
    `properties`/`$defs`/`definitions` values, object `items`, `anyOf`/`oneOf`/`allOf` items."""
    issues: list[dict[str, str]] = []
    for key, value in schema.items():
        if key not in ALLOWED_KEYWORDS:
            issues.append({"path": f"{path}/{key}", "message": f"Disallowed keyword: {key}"})
        if isinstance(value, list):
            if key in ("anyOf", "oneOf", "allOf"):
                for index, item in enumerate(value):
                    if isinstance(item, dict):
                        issues.extend(disallowed_keywords(item, f"{path}/{key}/{index}"))
            continue
        if not isinstance(value, dict):
            continue
        if key in ("properties", "$defs", "definitions"):
            for name, subschema in value.items():
                if isinstance(subschema, dict):
                    issues.extend(disallowed_keywords(subschema, f"{path}/{key}/{name}"))
        elif key == "items":
            issues.extend(disallowed_keywords(value, f"{path}/items"))
    return issues


# --- compiling ---------------------------------------------------------------------------


def _nested_deeper_than(node: Any, limit: int) -> bool:
    if limit < 0:
        return True
    if isinstance(node, dict):
        return any(_nested_deeper_than(value, limit - 1) for value in node.values())
    if isinstance(node, list):
        return any(_nested_deeper_than(item, limit - 1) for item in node)
    return False


def _dialect_of(schema: dict[str, Any]) -> type[Validator] | None:
    """The validator class for the schema's `$schema`, or None when it names no known draft."""
    declared = schema.get("$schema")
    if declared is None:
        return _DEFAULT_DIALECT
    if not isinstance(declared, str):
        return None
    bare = re.sub(r"^https?://", "", declared).rstrip("#")
    return _DIALECTS.get(bare)


def _compile_problems(schema: dict[str, Any]) -> list[dict[str, str]]:
    dialect = _dialect_of(schema)
    if dialect is None:
        return [{"path": "/$schema", "message": f"unknown $schema: {schema.get('$schema')!r}"}]
    meta_validator = dialect(dialect.META_SCHEMA, format_checker=_FORMAT_CHECKER)
    problems = [
        {"path": _pointer(error.absolute_path), "message": _first_line(error.message)}
        for error in meta_validator.iter_errors(schema)
    ]
    if problems:
        return problems
    return list(_unresolvable_refs(schema, dialect))


def _unresolvable_refs(
    schema: dict[str, Any], dialect: type[Validator]
) -> Iterator[dict[str, str]]:
    """Every `$ref` that would fail at validation time (remote references are never fetched)."""
    specification = specification_with(dialect.META_SCHEMA["$id"])
    root = Registry().resolver_with_root(specification.create_resource(schema))

    def walk(node: Any, resolver: Any, path: str) -> Iterator[dict[str, str]]:
        if isinstance(node, list):
            for index, item in enumerate(node):
                yield from walk(item, resolver, f"{path}/{index}")
            return
        if not isinstance(node, dict):
            return
        if isinstance(node.get("$id"), str):  # a new base URI for the refs below it
            resolver = resolver.in_subresource(specification.create_resource(node))
        reference = node.get("$ref")
        if isinstance(reference, str):
            try:
                resolver.lookup(reference)
            except Unresolvable:
                yield {"path": f"{path}/$ref", "message": f"can't resolve reference {reference}"}
        for key, value in node.items():
            # `enum`/`const`/`default` hold data, not subschemas.
            if key not in ("enum", "const", "default"):
                yield from walk(value, resolver, f"{path}/{key}")

    yield from walk(schema, root, "")


@lru_cache(maxsize=_COMPILED_CACHE_SIZE)
def _compiled(canonical_schema: str) -> Validator:
    """One validator per distinct schema (keyed by canonical JSON), shared by every request.
    A bounded memo of a pure function; no state that another process would need."""
    schema = orjson.loads(canonical_schema)
    if not isinstance(schema, dict):
        raise ValueError("a schema must be an object")
    problems = _compile_problems(schema)
    dialect = _dialect_of(schema)
    if problems or dialect is None:
        raise ValueError("; ".join(f"{p['path']} {p['message']}" for p in problems))
    return _with_ajv_keywords(dialect)(schema, format_checker=_FORMAT_CHECKER)


def _canonical_json(schema: Any) -> str:
    # Compact JSON in the schema's own key order: property order decides the order of the
    # reported errors (as in Ajv, which reads schemas in their jsonb order).
    return orjson.dumps(schema).decode()


@cache
def _with_ajv_keywords(dialect: type[Validator]) -> type[Validator]:
    """The dialect read the way Ajv reads it: OpenAPI `nullable: true` lets null pass the
    `type` check, and `pattern` is a JavaScript regex."""
    plain_type = dialect.VALIDATORS["type"]

    def nullable_type(
        validator: Validator, types: Any, instance: Any, schema: dict[str, Any]
    ) -> Iterator[ValidationError]:
        if instance is None and schema.get("nullable") is True:
            return
        yield from plain_type(validator, types, instance, schema)

    def ecma_pattern(
        validator: Validator, pattern: str, instance: Any, schema: dict[str, Any]
    ) -> Iterator[ValidationError]:
        if isinstance(instance, str) and not _ecma_pattern(pattern).search(instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")

    return validators.extend(dialect, {"type": nullable_type, "pattern": ecma_pattern})


# --- Ajv-like error reports ----------------------------------------------------------------


# Ajv checks keywords in a fixed order (type, then untyped, number, string, array and object
# keywords), not in the schema's key order, which jsonb storage reshuffles anyway.
_AJV_KEYWORD_RANK = {
    keyword: rank
    for rank, keyword in enumerate(
        [
            "$ref",
            "type",
            "const",
            "enum",
            "not",
            "anyOf",
            "oneOf",
            "allOf",
            "maximum",
            "minimum",
            "exclusiveMaximum",
            "exclusiveMinimum",
            "maxLength",
            "minLength",
            "pattern",
            "format",
            "maxItems",
            "minItems",
            "items",
            "required",
            "additionalProperties",
            "properties",
        ],
        start=1,
    )
}


def _ajv_order(schema: Any, error: ValidationError) -> tuple[int, ...]:
    """Sort key along the error's schema path: keywords by Ajv's rank, property names by their
    position in the schema, indexes as they are (past a `$ref`, positions are unknown: 0)."""
    ranks: list[int] = []
    node: Any = schema
    previous: Any = None
    for part in error.absolute_schema_path:
        is_name = previous in ("properties", "$defs", "definitions")
        if is_name and isinstance(node, dict):
            ranks.append(list(node).index(part) if part in node else 0)
        elif isinstance(part, str) and not is_name:
            ranks.append(_AJV_KEYWORD_RANK.get(part, 0))
        else:
            ranks.append(part if isinstance(part, int) else 0)
        node = _child(node, part)
        previous = None if is_name else part
    return tuple(ranks)


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _detail(error: ValidationError) -> dict[str, str]:
    return {"path": _pointer(error.absolute_path), "message": _ajv_message(error)}


def _pointer(parts: Any) -> str:
    encoded = [str(part).replace("~", "~0").replace("/", "~1") for part in parts]
    return "".join(f"/{part}" for part in encoded) or "/"


def _js_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ajv_message(error: ValidationError) -> str:
    """Ajv 8's English messages for the keywords of the allowed subset."""
    keyword = error.validator
    expected = error.validator_value
    if keyword == "type":
        names = expected if isinstance(expected, list) else [expected]
        return f"must be {','.join(names)}"
    if keyword == "required":
        missing = error.message.split("'")[1] if error.message.startswith("'") else error.message
        return f"must have required property '{missing}'"
    if keyword == "additionalProperties":
        return "must NOT have additional properties"
    if keyword == "minLength":
        return f"must NOT have fewer than {expected} characters"
    if keyword == "maxLength":
        return f"must NOT have more than {expected} characters"
    if keyword == "minItems":
        return f"must NOT have fewer than {expected} items"
    if keyword == "maxItems":
        return f"must NOT have more than {expected} items"
    comparisons = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if keyword in comparisons and not isinstance(expected, bool):
        return f"must be {comparisons[keyword]} {_js_number(expected)}"
    if keyword == "pattern":
        return f'must match pattern "{expected}"'
    if keyword == "format":
        return f'must match format "{expected}"'
    if keyword == "const":
        return "must be equal to constant"
    if keyword == "enum":
        return "must be equal to one of the allowed values"
    if keyword == "anyOf":
        return "must match a schema in anyOf"
    if keyword == "oneOf":
        return "must match exactly one schema in oneOf"
    if keyword == "not":
        return "must NOT be valid"
    if keyword is None or keyword == "false":
        return "boolean schema is false"
    return _first_line(error.message)


def _first_line(error: BaseException | str) -> str:
    text = str(error) if isinstance(error, BaseException) else error
    return text.splitlines()[0] if text else "invalid"

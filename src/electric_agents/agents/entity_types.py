"""Entity types (spec/02 §3.3, spec/03 §5.1): register (upsert, with serve-endpoint discovery),
read, amend schemas additively, delete, and the built-in `principal` type."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from electric_agents.agents import entity_type_store as store
from electric_agents.agents.dispatch_policy import (
    REWRITE_LOOPBACK_ENV,
    dispatch_policy_problems,
    rewrite_loopback_url,
    webhook_policy,
)
from electric_agents.agents.entity_type_store import EntityType
from electric_agents.agents.schemas import check_schema
from electric_agents.config import env_value
from electric_agents.errors import ApiError

if TYPE_CHECKING:
    from electric_agents.agents.runtime import AgentsRuntime

log = logging.getLogger(__name__)

PRINCIPAL_TYPE_NAME = "principal"

__all__ = [
    "PRINCIPAL_TYPE_NAME",
    "EntityType",
    "TypeRegistration",
    "amend_entity_type_schemas",
    "delete_entity_type",
    "ensure_principal_type",
    "list_entity_types",
    "register_entity_type",
    "require_entity_type",
]


@dataclass
class TypeRegistration:
    """What a register request (or a serve endpoint's manifest) asks for, aliases resolved."""

    name: str
    description: str
    creation_schema: Any = None
    inbox_schemas: Any = None
    state_schemas: Any = None
    serve_endpoint: str | None = None
    default_dispatch_policy: Any = None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> TypeRegistration:
        # `input_schemas`/`output_schemas` (what the TypeScript runtime sends) count only
        # when the canonical key is absent or null, like the reference's `??`.
        inbox = document.get("inbox_schemas")
        state = document.get("state_schemas")
        return cls(
            name=_optional_string(document, "name") or "",
            description=_optional_string(document, "description") or "",
            creation_schema=document.get("creation_schema"),
            inbox_schemas=inbox if inbox is not None else document.get("input_schemas"),
            state_schemas=state if state is not None else document.get("output_schemas"),
            serve_endpoint=_optional_string(document, "serve_endpoint") or None,
            default_dispatch_policy=document.get("default_dispatch_policy"),
        )


def _optional_string(document: dict[str, Any], key: str) -> str | None:
    # The route schema types request bodies; this guards manifests from serve endpoints.
    value = document.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(400, "INVALID_REQUEST", f"{key} must be a string")


# --- reading ---------------------------------------------------------------------------------


async def list_entity_types(runtime: AgentsRuntime) -> list[EntityType]:
    async with runtime.pool.acquire() as conn:
        return await store.list_entity_types(conn, runtime.tenant_id)


async def require_entity_type(runtime: AgentsRuntime, name: str) -> EntityType:
    """The type, or 404 `NOT_FOUND` (the GET route's error)."""
    async with runtime.pool.acquire() as conn:
        entity_type = await store.get_entity_type(conn, runtime.tenant_id, name)
    if entity_type is None:
        raise ApiError(404, "NOT_FOUND", "Entity type not found")
    return entity_type


# --- registering -----------------------------------------------------------------------------


async def register_entity_type(runtime: AgentsRuntime, document: dict[str, Any]) -> EntityType:
    """Create the type, or overwrite it with `revision + 1` (spec/02 §3.3)."""
    registration = TypeRegistration.from_document(document)
    _check_name(registration.name, action="registered or updated")
    if registration.serve_endpoint is not None:
        registration.serve_endpoint = _rewritten_serve_endpoint(registration.serve_endpoint)
        if not registration.description and registration.creation_schema is None:
            registration = await _discover_from_serve_endpoint(runtime, registration)
    entity_type = _validated_entity_type(registration)
    async with runtime.pool.acquire() as conn:
        stored = await store.upsert_entity_type(conn, runtime.tenant_id, entity_type)
    log.info("registered entity type %s (revision %d)", stored.name, stored.revision)
    return stored


def _check_name(name: str, *, action: str) -> None:
    if not name:
        raise ApiError(400, "INVALID_REQUEST", "Missing required field: name")
    if name == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            f'Entity type "{PRINCIPAL_TYPE_NAME}" is built in and cannot be {action}',
        )
    if name.startswith("_"):
        raise ApiError(400, "INVALID_REQUEST", 'Entity type names starting with "_" are reserved')


def _rewritten_serve_endpoint(url: str) -> str:
    try:
        return rewrite_loopback_url(url, env_value(REWRITE_LOOPBACK_ENV))
    except ValueError as error:
        # The reference answers 500 here; an unparsable URL is the caller's mistake.
        raise ApiError(400, "INVALID_REQUEST", f"Invalid serve_endpoint: {error}") from None


async def _discover_from_serve_endpoint(
    runtime: AgentsRuntime, registration: TypeRegistration
) -> TypeRegistration:
    """`PUT <serve_endpoint>` (no body) answers with the type's manifest, which is then
    registered in place of the request, at the requested endpoint."""
    endpoint = registration.serve_endpoint
    assert endpoint is not None
    try:
        response = await runtime.http.put(endpoint)
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as error:
        raise _unreachable(f"Failed to reach serve endpoint: {_describe(error)}") from None
    if not 200 <= response.status_code < 300:
        raise _unreachable(f"Serve endpoint returned status {response.status_code}")
    try:
        manifest = orjson.loads(response.content)
    except orjson.JSONDecodeError as error:
        raise _unreachable(f"Failed to reach serve endpoint: {_describe(error)}") from None
    if not isinstance(manifest, dict):
        raise _unreachable("Failed to reach serve endpoint: the manifest is not a JSON object")
    manifest_name = manifest.get("name")
    if manifest_name != registration.name:
        raise ApiError(
            400,
            "SERVE_ENDPOINT_NAME_MISMATCH",
            f'Serve endpoint returned name "{_js_string(manifest_name)}" '
            f'but expected "{registration.name}"',
        )
    discovered = TypeRegistration.from_document(manifest)
    discovered.serve_endpoint = endpoint
    return discovered


def _unreachable(message: str) -> ApiError:
    return ApiError(502, "SERVE_ENDPOINT_UNREACHABLE", message)


def _describe(error: Exception) -> str:
    return str(error) or type(error).__name__


def _js_string(value: Any) -> str:
    """How a template literal prints a manifest's `name` (`undefined`, `null`, `42`)."""
    if value is None:
        return "undefined"
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _validated_entity_type(registration: TypeRegistration) -> EntityType:
    """The row to store: required fields present, every schema usable, the policy valid."""
    if not registration.description:
        raise ApiError(400, "INVALID_REQUEST", "Missing required field: description")
    if registration.creation_schema is not None:
        check_schema(registration.creation_schema, where="creation_schema")
    _check_schema_map(registration.inbox_schemas, "inbox_schemas")
    _check_schema_map(registration.state_schemas, "state_schemas")
    policy = registration.default_dispatch_policy
    if policy is None and registration.serve_endpoint is not None:
        policy = webhook_policy(registration.serve_endpoint)
    if policy is not None:
        problems = dispatch_policy_problems(policy)
        if problems:
            raise ApiError(
                400,
                "INVALID_REQUEST",
                "default_dispatch_policy does not match dispatch policy schema: "
                + "; ".join(problems),
            )
    return EntityType(
        name=registration.name,
        description=registration.description,
        creation_schema=registration.creation_schema,
        inbox_schemas=registration.inbox_schemas,
        state_schemas=registration.state_schemas,
        serve_endpoint=registration.serve_endpoint,
        default_dispatch_policy=policy,
    )


def _check_schema_map(schemas: Any, field: str) -> None:
    if schemas is None:
        return
    if not isinstance(schemas, dict):
        raise ApiError(400, "INVALID_REQUEST", f"{field} must be an object of JSON Schemas")
    for key, schema in schemas.items():
        check_schema(schema, where=f"{field}.{key}")


# --- amending and deleting -------------------------------------------------------------------


async def amend_entity_type_schemas(
    runtime: AgentsRuntime,
    name: str,
    *,
    inbox_schemas: dict[str, Any] | None,
    state_schemas: dict[str, Any] | None,
) -> EntityType:
    """Add new message/event types to a type; existing keys are never replaced (409)."""
    if name == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            f'Entity type "{PRINCIPAL_TYPE_NAME}" is built in and cannot be amended',
        )
    _check_schema_map(inbox_schemas, "inbox_schemas")
    _check_schema_map(state_schemas, "state_schemas")
    async with runtime.pool.acquire() as conn, conn.transaction():
        existing = await store.get_entity_type(conn, runtime.tenant_id, name, for_update=True)
        if existing is None:
            raise ApiError(404, "UNKNOWN_ENTITY_TYPE", f'Entity type "{name}" not found')
        amended = await store.replace_schema_maps(
            conn,
            runtime.tenant_id,
            name,
            inbox_schemas=_merged(existing.inbox_schemas, inbox_schemas, "inbox"),
            state_schemas=_merged(existing.state_schemas, state_schemas, "state"),
        )
    assert amended is not None  # the row is locked
    log.info("amended entity type %s (revision %d)", amended.name, amended.revision)
    return amended


def _merged(
    existing: dict[str, Any] | None, additions: dict[str, Any] | None, kind: str
) -> dict[str, Any] | None:
    # An empty addition leaves the map alone: in the reference `{}` turned an absent map
    # (anything goes) into an empty one (every typed send rejected), which is not additive.
    if not additions:
        return existing
    current = existing or {}
    for key in additions:
        if key in current:
            raise ApiError(
                409, "SCHEMA_KEY_EXISTS", f"Cannot amend existing {kind} schema key: {key}"
            )
    return {**current, **additions}


async def delete_entity_type(runtime: AgentsRuntime, name: str) -> None:
    """Entities of the type keep running on their schema snapshots (spec/03 §5.1)."""
    if name == PRINCIPAL_TYPE_NAME:
        raise ApiError(
            400,
            "INVALID_REQUEST",
            f'Entity type "{PRINCIPAL_TYPE_NAME}" is built in and cannot be deleted',
        )
    async with runtime.pool.acquire() as conn:
        deleted = await store.delete_entity_type(conn, runtime.tenant_id, name)
    if not deleted:
        raise ApiError(404, "NOT_FOUND", f'Entity type "{name}" not found')
    log.info("deleted entity type %s", name)


# --- the built-in principal type (spec/02 §5.4) ------------------------------------------------

_STRING = {"type": "string"}

IDENTITY_STATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": ["user", "agent", "service", "system"]},
        "id": _STRING,
        "key": _STRING,
        "url": _STRING,
        "display_name": _STRING,
        "email": _STRING,
        "avatar_url": _STRING,
        "auth_provider": _STRING,
        "auth_subject": _STRING,
        "claims": {"type": "object"},
        "created_at": _STRING,
        "updated_at": _STRING,
    },
    "required": ["kind", "id", "key", "url", "updated_at"],
    "additionalProperties": False,
}

UPDATE_IDENTITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"identity": IDENTITY_STATE_SCHEMA},
    "required": ["identity"],
    "additionalProperties": False,
}


def principal_entity_type() -> EntityType:
    return EntityType(
        name=PRINCIPAL_TYPE_NAME,
        description="built-in principal entity",
        inbox_schemas={"update_identity": UPDATE_IDENTITY_SCHEMA},
        state_schemas={"identity": IDENTITY_STATE_SCHEMA},
    )


async def ensure_principal_type(runtime: AgentsRuntime) -> None:
    """Create the `principal` type at startup unless it exists (idempotent across restarts
    and across server processes sharing one database)."""
    async with runtime.pool.acquire() as conn:
        await store.insert_entity_type_if_absent(conn, runtime.tenant_id, principal_entity_type())

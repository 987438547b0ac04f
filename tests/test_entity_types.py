"""Entity types over HTTP (spec/02 §3.3, §5.4; spec/03 §5.1) against a real `serve` process.

Serve-endpoint discovery is tested against a real HTTP receiver on 127.0.0.1 that answers the
server's `PUT <serve_endpoint>` with a manifest the test chooses.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from conftest import ServerFactory, ServerProcess, free_port
from electric_agents.agents.schemas import check_schema, validation_errors
from electric_agents.errors import ApiError

JSON_UTF8 = "application/json; charset=utf-8"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PUBLIC_KEYS = [
    "name",
    "description",
    "creation_schema",
    "inbox_schemas",
    "state_schemas",
    "serve_endpoint",
    "default_dispatch_policy",
    "revision",
    "created_at",
    "updated_at",
    "input_schemas",
    "output_schemas",
]

# What zod emits (zod-to-json-schema, draft-07) and what pydantic emits (2020-12 style,
# `$defs` + `$ref`, Optional as anyOf-with-null, titles and defaults).
ZOD_CREATION_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "email": {"type": "string", "format": "email"},
        "id": {"type": "string", "format": "uuid"},
        "count": {"type": "integer", "minimum": 0, "maximum": 10},
        "slug": {"type": "string", "pattern": "^[a-z]+(?:-[a-z]+)*$"},
        "mood": {"type": "string", "enum": ["happy", "sad"]},
    },
    "required": ["email"],
    "additionalProperties": False,
}
ZOD_V4_MESSAGE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1},
        "emoji": {
            "type": "string",
            "pattern": r"^(\p{Extended_Pictographic}|\p{Emoji_Component})+$",
        },
        "at": {"type": "string", "format": "date-time"},
    },
    "required": ["text"],
    "additionalProperties": False,
}
PYDANTIC_STATE_SCHEMA: dict[str, Any] = {
    "$defs": {
        "Address": {
            "properties": {"city": {"title": "City", "type": "string"}},
            "required": ["city"],
            "title": "Address",
            "type": "object",
        }
    },
    "properties": {
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "default": None,
            "title": "Nickname",
        },
        "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
    },
    "required": ["address"],
    "title": "Profile",
    "type": "object",
}
WEBHOOK_POLICY = {"targets": [{"type": "webhook", "url": "http://127.0.0.1:9/hook"}]}


# --- helpers -------------------------------------------------------------------------------


def types_url(server: ServerProcess, suffix: str = "") -> str:
    return f"{server.origin}/_electric/entity-types{suffix}"


def register(client: httpx.Client, server: ServerProcess, body: Any) -> httpx.Response:
    return client.post(types_url(server), json=body)


def registered(client: httpx.Client, server: ServerProcess, body: Any) -> dict[str, Any]:
    response = register(client, server, body)
    assert response.status_code == 201, (response.status_code, response.text)
    assert response.headers["content-type"] == JSON_UTF8
    payload: dict[str, Any] = response.json()
    return payload


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == JSON_UTF8
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def assert_absent(client: httpx.Client, server: ServerProcess, name: str) -> None:
    assert client.get(types_url(server, f"/{name}")).status_code == 404


@dataclass
class ServeEndpoint:
    """A handler's serve endpoint: answers every request with `status` and `body` and records
    what it was asked (method, path, body)."""

    port: int
    status: int = 200
    body: bytes = b"{}"
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/handler"

    def answer_manifest(self, manifest: Any) -> None:
        self.status, self.body = 200, json.dumps(manifest).encode()


@pytest.fixture
def serve_endpoint() -> Iterator[ServeEndpoint]:
    endpoint = ServeEndpoint(port=0)

    class Handler(BaseHTTPRequestHandler):
        def handle_any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            endpoint.requests.append((self.command, self.path, body))
            self.send_response(endpoint.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(endpoint.body)))
            self.end_headers()
            self.wfile.write(endpoint.body)

        do_PUT = do_GET = do_POST = handle_any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    endpoint.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- the built-in principal type -------------------------------------------------------------


def test_principal_type_is_built_in_at_revision_1_with_identity_schemas(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    response = client.get(types_url(serve_server))
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_UTF8
    [principal] = [t for t in response.json() if t["name"] == "principal"]
    assert principal["description"] == "built-in principal entity"
    assert principal["revision"] == 1
    assert principal["creation_schema"] is None
    assert "serve_endpoint" not in principal and "default_dispatch_policy" not in principal
    identity = principal["state_schemas"]["identity"]
    assert sorted(identity["required"]) == ["id", "key", "kind", "updated_at", "url"]
    assert identity["additionalProperties"] is False
    update_identity = principal["inbox_schemas"]["update_identity"]
    assert update_identity["required"] == ["identity"]
    assert update_identity["properties"]["identity"] == identity
    assert principal["input_schemas"] == principal["inbox_schemas"]
    assert principal["output_schemas"] == principal["state_schemas"]

    good = {"kind": "user", "id": "alice", "key": "user:alice", "url": "/principal/user%3Aalice"}
    assert validation_errors(identity, {**good, "updated_at": "2026-01-02T03:04:05.678Z"}) == []
    assert validation_errors(identity, {**good, "kind": "robot"}) == [
        {"path": "/", "message": "must have required property 'updated_at'"},
        {"path": "/kind", "message": "must be equal to one of the allowed values"},
    ]


def test_principal_type_cannot_be_registered_amended_or_deleted(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    before = client.get(types_url(serve_server, "/principal")).json()
    register_error = error_of(
        register(client, serve_server, {"name": "principal", "description": "mine"}),
        400,
        "INVALID_REQUEST",
    )
    assert register_error["message"] == (
        'Entity type "principal" is built in and cannot be registered or updated'
    )
    amend = client.patch(
        types_url(serve_server, "/principal/schemas"), json={"inbox_schemas": {"x": {}}}
    )
    assert error_of(amend, 400, "INVALID_REQUEST")["message"] == (
        'Entity type "principal" is built in and cannot be amended'
    )
    delete = client.delete(types_url(serve_server, "/principal"))
    assert error_of(delete, 400, "INVALID_REQUEST")["message"] == (
        'Entity type "principal" is built in and cannot be deleted'
    )
    assert client.get(types_url(serve_server, "/principal")).json() == before


def test_principal_type_is_ensured_once_across_restarts(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    before = client.get(types_url(serve_server, "/principal")).json()
    serve_server.restart()
    after = client.get(types_url(serve_server, "/principal")).json()
    assert after == before
    assert after["revision"] == 1


# --- register ------------------------------------------------------------------------------


def test_register_returns_201_with_public_entity_type_in_spec_key_order(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "chat",
            "description": "A chat agent",
            "creation_schema": {"type": "object"},
            "inbox_schemas": {"message": {"type": "object"}},
            "state_schemas": {"reply": {"type": "object"}},
            "serve_endpoint": "http://127.0.0.1:9/handler",
            "default_dispatch_policy": WEBHOOK_POLICY,
        },
    )
    assert list(created) == PUBLIC_KEYS
    assert created["revision"] == 1
    assert created["serve_endpoint"] == "http://127.0.0.1:9/handler"
    assert created["default_dispatch_policy"] == WEBHOOK_POLICY
    assert ISO_MS.match(created["created_at"]) and created["updated_at"] == created["created_at"]
    assert client.get(types_url(serve_server, "/chat")).json() == created


def test_register_without_optional_fields_has_null_schemas_and_omits_endpoint_and_policy(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(client, serve_server, {"name": "bare", "description": "d"})
    assert list(created) == [
        key for key in PUBLIC_KEYS if key not in ("serve_endpoint", "default_dispatch_policy")
    ]
    for key in ("creation_schema", "inbox_schemas", "state_schemas"):
        assert created[key] is None
    assert created["input_schemas"] is None and created["output_schemas"] is None


def test_register_maps_input_and_output_schemas_and_ignores_unknown_keys(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "runtime-style",
            "description": "as the TypeScript runtime registers",
            "input_schemas": {"ask": {"type": "object"}},
            "output_schemas": {"answer": {"type": "object"}},
            "public_url": "http://example.invalid",
            "runtime_name": "default",
            "metadata_schema": {"type": "object"},
        },
    )
    assert created["inbox_schemas"] == created["input_schemas"] == {"ask": {"type": "object"}}
    assert created["state_schemas"] == created["output_schemas"] == {"answer": {"type": "object"}}
    assert "metadata_schema" not in created and "public_url" not in created


def test_canonical_schema_keys_win_over_aliases(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "both",
            "description": "d",
            "inbox_schemas": {"canonical": {}},
            "input_schemas": {"alias": {}},
        },
    )
    assert created["inbox_schemas"] == {"canonical": {}}


def test_empty_schema_map_stays_distinct_from_absent(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client, serve_server, {"name": "strict", "description": "d", "inbox_schemas": {}}
    )
    assert created["inbox_schemas"] == {}
    assert created["state_schemas"] is None


def test_reregistering_overwrites_fields_bumps_revision_and_keeps_created_at(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    first = registered(
        client,
        serve_server,
        {
            "name": "worker",
            "description": "v1",
            "creation_schema": {"type": "object"},
            "inbox_schemas": {"a": {}},
            "default_dispatch_policy": WEBHOOK_POLICY,
        },
    )
    second = registered(client, serve_server, {"name": "worker", "description": "v2"})
    third = registered(client, serve_server, {"name": "worker", "description": "v3"})
    assert [first["revision"], second["revision"], third["revision"]] == [1, 2, 3]
    assert third["description"] == "v3"
    assert third["created_at"] == first["created_at"]
    assert third["updated_at"] >= first["updated_at"]
    # Every column is overwritten: what the new registration leaves out is gone.
    assert third["creation_schema"] is None and third["inbox_schemas"] is None
    assert "default_dispatch_policy" not in third


MISSING_FIELDS_AND_RESERVED_NAMES: list[tuple[dict[str, Any], str]] = [
    ({}, "Missing required field: name"),
    ({"name": "", "description": "d"}, "Missing required field: name"),
    (
        {"name": "_internal", "description": "d"},
        'Entity type names starting with "_" are reserved',
    ),
    ({"name": "nodesc"}, "Missing required field: description"),
    ({"name": "nodesc", "description": ""}, "Missing required field: description"),
]


def test_register_rejects_missing_fields_and_reserved_names(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for body, message in MISSING_FIELDS_AND_RESERVED_NAMES:
        error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
        assert error["message"] == message, body
        if body.get("name"):
            assert_absent(client, serve_server, body["name"])


def test_register_with_an_empty_body_is_400(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    response = client.post(types_url(serve_server), content=b"")
    assert error_of(response, 400, "INVALID_REQUEST")["message"] == "Missing required field: name"


def test_register_with_invalid_json_is_400(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    response = client.post(types_url(serve_server), content=b"{not json")
    assert error_of(response, 400, "INVALID_REQUEST")["message"] == "Invalid JSON body"


BODIES_NOT_MATCHING_THE_API_SCHEMA: list[tuple[Any, str]] = [
    ({"name": 5, "description": "d"}, "/name"),
    ({"name": "t", "description": "d", "creation_schema": "object"}, "/creation_schema"),
    ({"name": "t", "description": "d", "inbox_schemas": {"a": "x"}}, "/inbox_schemas/a"),
    ({"name": "t", "description": "d", "output_schemas": []}, "/output_schemas"),
    ({"name": "t", "description": "d", "serve_endpoint": 1}, "/serve_endpoint"),
    (["not", "an", "object"], "/"),
]


def test_register_body_not_matching_the_api_schema_is_400_with_details(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for body, path in BODIES_NOT_MATCHING_THE_API_SCHEMA:
        error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
        assert error["message"] == "Request body does not match API schema", body
        assert path in [detail["path"] for detail in error["details"]], (body, error)


INVALID_DISPATCH_POLICIES: list[dict[str, Any]] = [
    {"targets": []},
    {"targets": [WEBHOOK_POLICY["targets"][0], WEBHOOK_POLICY["targets"][0]]},
    {"targets": [{"type": "webhook", "url": ""}]},
    {"targets": [{"type": "webhook", "url": "http://x", "extra": 1}]},
    {"targets": [{"type": "runner"}]},
    {"targets": [{"type": "email", "url": "x"}]},
    {"targets": [{"type": "runner", "runnerId": "r1"}], "extra": True},
]


def test_register_rejects_an_invalid_default_dispatch_policy(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for policy in INVALID_DISPATCH_POLICIES:
        body = {"name": "policy", "description": "d", "default_dispatch_policy": policy}
        error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
        assert error["message"] == "Request body does not match API schema", policy
    assert_absent(client, serve_server, "policy")


def test_register_accepts_a_runner_policy_with_a_subscription_id(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    policy = {"targets": [{"type": "runner", "runnerId": "r1", "subscription_id": "sub"}]}
    created = registered(
        client,
        serve_server,
        {"name": "pulled", "description": "d", "default_dispatch_policy": policy},
    )
    assert created["default_dispatch_policy"] == policy


def test_serve_endpoint_with_a_description_is_not_fetched_and_becomes_the_default_policy(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    created = registered(
        client,
        serve_server,
        {"name": "hooked", "description": "d", "serve_endpoint": serve_endpoint.url},
    )
    assert created["serve_endpoint"] == serve_endpoint.url
    assert created["default_dispatch_policy"] == {
        "targets": [{"type": "webhook", "url": serve_endpoint.url}]
    }
    assert serve_endpoint.requests == []


def test_an_explicit_default_policy_wins_over_the_serve_endpoint(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    policy = {"targets": [{"type": "webhook", "url": serve_endpoint.url, "subscription_id": "s"}]}
    created = registered(
        client,
        serve_server,
        {
            "name": "hooked",
            "description": "d",
            "serve_endpoint": serve_endpoint.url,
            "default_dispatch_policy": policy,
        },
    )
    assert created["default_dispatch_policy"] == policy


# --- user schemas ----------------------------------------------------------------------------


def test_zod_draft07_and_zod_v4_2020_12_schemas_register(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "zod",
            "description": "zod schemas",
            "creation_schema": ZOD_CREATION_SCHEMA,
            "inbox_schemas": {"message": ZOD_V4_MESSAGE_SCHEMA},
        },
    )
    assert created["creation_schema"] == ZOD_CREATION_SCHEMA
    assert created["inbox_schemas"] == {"message": ZOD_V4_MESSAGE_SCHEMA}


def test_pydantic_schemas_with_defs_and_refs_register(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    pydantic_2020 = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    created = registered(
        client,
        serve_server,
        {
            "name": "pydantic",
            "description": "pydantic schemas",
            "creation_schema": PYDANTIC_STATE_SCHEMA,
            "state_schemas": {"profile": {**pydantic_2020, **PYDANTIC_STATE_SCHEMA}},
        },
    )
    assert created["creation_schema"] == PYDANTIC_STATE_SCHEMA
    # Property names that look like keywords are names, not keywords.
    odd_names = {"type": "object", "properties": {"$id": {"type": "string"}, "$ref": {}}}
    registered(
        client, serve_server, {"name": "odd", "description": "d", "creation_schema": odd_names}
    )


def test_schemas_with_disallowed_keywords_are_400_with_every_offending_path(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    schema = {
        "type": "object",
        "x-foo": 1,
        "properties": {"a": {"type": "string", "if": {}}},
        "anyOf": [{"patternProperties": {}}],
        "items": {"uniqueItems": True},
        "$defs": {"D": {"then": {}}},
    }
    error = error_of(
        register(
            client, serve_server, {"name": "t", "description": "d", "creation_schema": schema}
        ),
        400,
        "INVALID_REQUEST",
    )
    assert error["message"] == "Schema uses disallowed keywords"
    assert error["details"] == [
        {"path": "/x-foo", "message": "Disallowed keyword: x-foo"},
        {"path": "/properties/a/if", "message": "Disallowed keyword: if"},
        {"path": "/anyOf/0/patternProperties", "message": "Disallowed keyword: patternProperties"},
        {"path": "/items/uniqueItems", "message": "Disallowed keyword: uniqueItems"},
        {"path": "/$defs/D/then", "message": "Disallowed keyword: then"},
    ]
    assert_absent(client, serve_server, "t")


def test_disallowed_keywords_in_schema_maps_are_400(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for field_name in ("inbox_schemas", "state_schemas", "input_schemas", "output_schemas"):
        body = {"name": "t", "description": "d", field_name: {"ev": {"prefixItems": []}}}
        error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
        assert error["message"] == "Schema uses disallowed keywords", field_name
        assert error["details"] == [
            {"path": "/prefixItems", "message": "Disallowed keyword: prefixItems"}
        ]
    assert_absent(client, serve_server, "t")


UNCOMPILABLE_SCHEMAS: list[tuple[dict[str, Any], str]] = [
    ({"type": "string", "format": 123}, "/format"),
    ({"type": "object", "properties": {"e": {"format": ["email"]}}}, "/properties/e/format"),
    ({"type": "strin"}, "/type"),
    ({"type": "string", "pattern": "("}, "/pattern"),
    ({"type": "string", "minLength": -1}, "/minLength"),
    ({"required": "name"}, "/required"),
    ({"properties": {"a": {"$ref": "#/$defs/Missing"}}}, "/properties/a/$ref"),
    ({"$ref": "https://example.invalid/schema.json"}, "/$ref"),
    ({"$schema": "http://example.invalid/my-dialect"}, "/$schema"),
]


def test_schemas_that_cannot_compile_are_400_never_500(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for schema, path in UNCOMPILABLE_SCHEMAS:
        for body in (
            {"name": "t", "description": "d", "creation_schema": schema},
            {"name": "t", "description": "d", "state_schemas": {"ev": schema}},
        ):
            error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
            assert error["message"].endswith("is not a valid JSON Schema"), error
            assert path in [detail["path"] for detail in error["details"]], error
    too_deep: dict[str, Any] = {"type": "string"}
    for _ in range(60):
        too_deep = {"type": "object", "properties": {"a": too_deep}}
    body = {"name": "t", "description": "d", "creation_schema": too_deep}
    error = error_of(register(client, serve_server, body), 400, "INVALID_REQUEST")
    assert error["message"] == "creation_schema is nested more than 100 levels deep"
    assert_absent(client, serve_server, "t")


def test_known_and_unknown_format_names_register(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    # The reference compiled `format` with Ajv's strict mode and no formats, so every schema
    # using it failed with a 500 at first use. Known formats validate; unknown are annotations.
    schema = {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "secret": {"type": "string", "format": "password"},
            "id": {"type": "string", "format": "cuid2"},
        },
    }
    created = registered(
        client, serve_server, {"name": "formats", "description": "d", "creation_schema": schema}
    )
    assert created["creation_schema"] == schema


# --- get, list, delete -----------------------------------------------------------------------


def test_get_unknown_type_is_404_not_found(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    error = error_of(client.get(types_url(serve_server, "/nope")), 404, "NOT_FOUND")
    assert error["message"] == "Entity type not found"


def test_list_is_ordered_by_name_and_includes_principal(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    for name in ("zeta", "alpha", "Mid", "beta"):
        registered(client, serve_server, {"name": name, "description": name})
    names = [t["name"] for t in client.get(types_url(serve_server, "/")).json()]
    assert names == ["Mid", "alpha", "beta", "principal", "zeta"]


def test_delete_is_204_empty_and_the_type_is_gone(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    registered(client, serve_server, {"name": "gone", "description": "d"})
    response = client.delete(types_url(serve_server, "/gone"))
    assert response.status_code == 204
    assert response.content == b"" and "content-type" not in response.headers
    assert_absent(client, serve_server, "gone")
    again = client.delete(types_url(serve_server, "/gone"))
    assert error_of(again, 404, "NOT_FOUND")["message"] == 'Entity type "gone" not found'


def test_a_deleted_type_can_be_registered_again_from_revision_1(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    registered(client, serve_server, {"name": "phoenix", "description": "d"})
    registered(client, serve_server, {"name": "phoenix", "description": "d"})
    assert client.delete(types_url(serve_server, "/phoenix")).status_code == 204
    assert (
        registered(client, serve_server, {"name": "phoenix", "description": "d"})["revision"] == 1
    )


# --- amend ---------------------------------------------------------------------------------


def test_amend_adds_new_keys_bumps_revision_and_keeps_the_default_dispatch_policy(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "amendable",
            "description": "d",
            "inbox_schemas": {"a": {"type": "object"}},
            "state_schemas": {"x": {"type": "object"}},
            "default_dispatch_policy": WEBHOOK_POLICY,
        },
    )
    response = client.patch(
        types_url(serve_server, "/amendable/schemas"),
        json={"inbox_schemas": {"b": {"type": "string"}}, "state_schemas": {"y": {}}},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_UTF8
    amended = response.json()
    assert list(amended) == [key for key in PUBLIC_KEYS if key != "serve_endpoint"]
    assert amended["inbox_schemas"] == {"a": {"type": "object"}, "b": {"type": "string"}}
    assert amended["state_schemas"] == {"x": {"type": "object"}, "y": {}}
    assert amended["input_schemas"] == amended["inbox_schemas"]
    assert amended["revision"] == created["revision"] + 1
    assert amended["created_at"] == created["created_at"]
    # The reference wrote this column back as NULL (spec/03 §6.9 #4); it must survive.
    assert amended["default_dispatch_policy"] == WEBHOOK_POLICY
    assert client.get(types_url(serve_server, "/amendable")).json() == amended


def test_amend_accepts_input_and_output_aliases_and_fills_absent_maps(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    registered(client, serve_server, {"name": "aliases", "description": "d"})
    response = client.patch(
        types_url(serve_server, "/aliases/schemas"),
        json={"input_schemas": {"ask": {}}, "output_schemas": {"said": {}}},
    )
    assert response.status_code == 200, response.text
    amended = response.json()
    assert amended["inbox_schemas"] == {"ask": {}}
    assert amended["state_schemas"] == {"said": {}}
    assert amended["revision"] == 2


def test_amend_with_an_empty_map_does_not_turn_an_absent_map_into_an_empty_one(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    registered(client, serve_server, {"name": "open", "description": "d"})
    response = client.patch(types_url(serve_server, "/open/schemas"), json={"inbox_schemas": {}})
    assert response.status_code == 200
    assert response.json()["inbox_schemas"] is None


AMENDMENTS_OF_EXISTING_KEYS: list[tuple[dict[str, Any], str]] = [
    ({"inbox_schemas": {"a": {"type": "string"}}}, "Cannot amend existing inbox schema key: a"),
    ({"input_schemas": {"new": {}, "a": {}}}, "Cannot amend existing inbox schema key: a"),
    ({"state_schemas": {"x": {"type": "object"}}}, "Cannot amend existing state schema key: x"),
    ({"output_schemas": {"x": {}}}, "Cannot amend existing state schema key: x"),
    # The same schema again is still a conflict (the reference checks keys, not values).
    ({"inbox_schemas": {"a": {"type": "object"}}}, "Cannot amend existing inbox schema key: a"),
]


def test_amend_never_replaces_an_existing_key(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(
        client,
        serve_server,
        {
            "name": "fixed",
            "description": "d",
            "inbox_schemas": {"a": {"type": "object"}},
            "state_schemas": {"x": {"type": "object"}},
        },
    )
    for body, message in AMENDMENTS_OF_EXISTING_KEYS:
        response = client.patch(types_url(serve_server, "/fixed/schemas"), json=body)
        assert error_of(response, 409, "SCHEMA_KEY_EXISTS")["message"] == message, body
    assert client.get(types_url(serve_server, "/fixed")).json() == created


def test_amend_unknown_type_is_404_unknown_entity_type(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    response = client.patch(
        types_url(serve_server, "/missing/schemas"), json={"inbox_schemas": {"a": {}}}
    )
    error = error_of(response, 404, "UNKNOWN_ENTITY_TYPE")
    assert error["message"] == 'Entity type "missing" not found'


def test_amend_rejects_disallowed_keywords_and_uncompilable_schemas(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    created = registered(client, serve_server, {"name": "guarded", "description": "d"})
    url = types_url(serve_server, "/guarded/schemas")
    disallowed = client.patch(url, json={"inbox_schemas": {"a": {"if": {}}}})
    error = error_of(disallowed, 400, "INVALID_REQUEST")
    assert error["message"] == "Schema uses disallowed keywords"
    assert error["details"] == [{"path": "/if", "message": "Disallowed keyword: if"}]
    bad_format = client.patch(url, json={"state_schemas": {"e": {"format": 7}}})
    assert error_of(bad_format, 400, "INVALID_REQUEST")["details"][0]["path"] == "/format"
    assert client.get(types_url(serve_server, "/guarded")).json() == created


def test_amend_body_not_matching_the_api_schema_is_400(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    registered(client, serve_server, {"name": "typed", "description": "d"})
    response = client.patch(
        types_url(serve_server, "/typed/schemas"), json={"inbox_schemas": {"a": 1}}
    )
    error = error_of(response, 400, "INVALID_REQUEST")
    assert error["message"] == "Request body does not match API schema"
    assert error["details"] == [{"path": "/inbox_schemas/a", "message": "must be object"}]


# --- serve-endpoint discovery ----------------------------------------------------------------


def test_discovery_registers_the_manifest_at_the_requested_endpoint(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    serve_endpoint.answer_manifest(
        {
            "name": "discovered",
            "description": "from the manifest",
            "creation_schema": ZOD_CREATION_SCHEMA,
            "input_schemas": {"message": {"type": "object"}},
            "output_schemas": {"reply": {"type": "object"}},
            "serve_endpoint": "http://elsewhere.invalid/ignored",
        }
    )
    created = registered(
        client, serve_server, {"name": "discovered", "serve_endpoint": serve_endpoint.url}
    )
    assert serve_endpoint.requests == [("PUT", "/handler", b"")]
    assert created["description"] == "from the manifest"
    assert created["creation_schema"] == ZOD_CREATION_SCHEMA
    assert created["inbox_schemas"] == {"message": {"type": "object"}}
    assert created["state_schemas"] == {"reply": {"type": "object"}}
    assert created["serve_endpoint"] == serve_endpoint.url
    assert created["default_dispatch_policy"] == {
        "targets": [{"type": "webhook", "url": serve_endpoint.url}]
    }


def test_discovery_name_mismatch_is_400(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    serve_endpoint.answer_manifest({"name": "other", "description": "d"})
    response = register(
        client, serve_server, {"name": "mine", "serve_endpoint": serve_endpoint.url}
    )
    error = error_of(response, 400, "SERVE_ENDPOINT_NAME_MISMATCH")
    assert error["message"] == 'Serve endpoint returned name "other" but expected "mine"'
    assert_absent(client, serve_server, "mine")


def test_discovery_non_2xx_is_502(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    serve_endpoint.status, serve_endpoint.body = 503, b"{}"
    response = register(
        client, serve_server, {"name": "down", "serve_endpoint": serve_endpoint.url}
    )
    error = error_of(response, 502, "SERVE_ENDPOINT_UNREACHABLE")
    assert error["message"] == "Serve endpoint returned status 503"


def test_discovery_of_an_unreachable_endpoint_is_502(
    serve_server: ServerProcess, client: httpx.Client
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/handler"
    response = register(client, serve_server, {"name": "nobody", "serve_endpoint": closed})
    error = error_of(response, 502, "SERVE_ENDPOINT_UNREACHABLE")
    assert error["message"].startswith("Failed to reach serve endpoint: ")


def test_discovery_of_a_non_manifest_answer_is_502(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    for body in (b"not json", b"[1, 2]"):
        serve_endpoint.status, serve_endpoint.body = 200, body
        response = register(
            client, serve_server, {"name": "odd", "serve_endpoint": serve_endpoint.url}
        )
        error = error_of(response, 502, "SERVE_ENDPOINT_UNREACHABLE")
        assert error["message"].startswith("Failed to reach serve endpoint: "), body


def test_discovery_manifest_with_an_invalid_dispatch_policy_is_400(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    serve_endpoint.answer_manifest(
        {"name": "badpolicy", "description": "d", "default_dispatch_policy": {"targets": []}}
    )
    response = register(
        client, serve_server, {"name": "badpolicy", "serve_endpoint": serve_endpoint.url}
    )
    error = error_of(response, 400, "INVALID_REQUEST")
    assert error["message"].startswith(
        "default_dispatch_policy does not match dispatch policy schema: /targets "
    ), error


MANIFESTS_REJECTED_LIKE_REQUESTS: list[tuple[dict[str, Any], str | None]] = [
    ({"name": "m", "creation_schema": {"x-nope": 1}}, "Missing required field: description"),
    ({"name": "m", "description": "d", "creation_schema": {"x-nope": 1}}, None),
    ({"name": "m", "description": 5}, "description must be a string"),
    ({"name": "m", "description": "d", "inbox_schemas": {"a": 1}}, None),
    ({"name": "m", "description": "d", "state_schemas": []}, None),
]


def test_discovery_manifest_is_checked_like_a_request(
    serve_server: ServerProcess, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    for manifest, message in MANIFESTS_REJECTED_LIKE_REQUESTS:
        serve_endpoint.answer_manifest(manifest)
        response = register(
            client, serve_server, {"name": "m", "serve_endpoint": serve_endpoint.url}
        )
        error = error_of(response, 400, "INVALID_REQUEST")
        if message is not None:
            assert error["message"] == message, manifest
    assert_absent(client, serve_server, "m")


def test_loopback_serve_endpoint_is_rewritten_before_discovery_and_storage(
    server_factory: ServerFactory, client: httpx.Client, serve_endpoint: ServeEndpoint
) -> None:
    server = server_factory(
        "serve", env={"ELECTRIC_AGENTS_REWRITE_LOOPBACK_WEBHOOKS_TO": "127.0.0.1"}
    )
    serve_endpoint.answer_manifest({"name": "rewritten", "description": "d"})
    loopback = f"http://localhost:{serve_endpoint.port}/handler"
    created = registered(client, server, {"name": "rewritten", "serve_endpoint": loopback})
    assert serve_endpoint.requests == [("PUT", "/handler", b"")]
    assert created["serve_endpoint"] == serve_endpoint.url
    assert created["default_dispatch_policy"]["targets"][0]["url"] == serve_endpoint.url


# --- the schema functions other modules call ---------------------------------------------------


def test_validation_errors_use_ajv_paths_and_messages() -> None:
    assert validation_errors(ZOD_CREATION_SCHEMA, {"email": "a@b.co", "count": 3}) == []
    assert validation_errors(
        ZOD_CREATION_SCHEMA,
        {"email": "nope", "id": "x", "count": 11, "slug": "A", "mood": "meh", "extra": 1},
    ) == [
        {"path": "/", "message": "must NOT have additional properties"},
        {"path": "/email", "message": 'must match format "email"'},
        {"path": "/id", "message": 'must match format "uuid"'},
        {"path": "/count", "message": "must be <= 10"},
        {"path": "/slug", "message": 'must match pattern "^[a-z]+(?:-[a-z]+)*$"'},
        {"path": "/mood", "message": "must be equal to one of the allowed values"},
    ]
    assert validation_errors(ZOD_CREATION_SCHEMA, "text") == [
        {"path": "/", "message": "must be object"}
    ]


def test_validation_errors_read_pydantic_refs_and_zod_v4_unicode_patterns() -> None:
    assert validation_errors(PYDANTIC_STATE_SCHEMA, {"address": {"city": "Oslo"}}) == []
    assert validation_errors(PYDANTIC_STATE_SCHEMA, {"address": {}, "nickname": 3}) == [
        {"path": "/address", "message": "must have required property 'city'"},
        {"path": "/nickname", "message": "must match a schema in anyOf"},
    ]
    assert validation_errors(ZOD_V4_MESSAGE_SCHEMA, {"text": "hi", "emoji": "🙂"}) == []
    assert validation_errors(ZOD_V4_MESSAGE_SCHEMA, {"text": "", "at": "yesterday"}) == [
        {"path": "/text", "message": "must NOT have fewer than 1 characters"},
        {"path": "/at", "message": 'must match format "date-time"'},
    ]


def test_validation_errors_honour_nullable_and_never_raise_on_a_broken_schema() -> None:
    assert validation_errors({"type": "string", "nullable": True}, None) == []
    assert validation_errors({"type": "string"}, None) == [
        {"path": "/", "message": "must be string"}
    ]
    broken = validation_errors({"$ref": "#/nowhere"}, {})
    assert len(broken) == 1 and broken[0]["path"] == "/"


def test_check_schema_raises_400_api_errors() -> None:
    check_schema(ZOD_CREATION_SCHEMA, where="creation_schema")
    for bad in (["not", "a", "schema"], {"if": {}}, {"format": 1}):
        with pytest.raises(ApiError) as raised:
            check_schema(bad, where="creation_schema")
        assert (raised.value.status, raised.value.code) == (400, "INVALID_REQUEST")

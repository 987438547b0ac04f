"""Event-source subscriptions over HTTP (spec/02 §3.2 `GET /_electric/event-sources`, §3.4
`PUT|DELETE …/event-source-subscriptions/:id`; spec/03 §5.9) against a real `electric-agents
serve` started with `--event-sources`: the catalog, every refusal, the manifest and the wake
registration, webhook appends waking the subscriber, lifetimes and filters."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from agents_support import (
    TENANT,
    eventually,
    mint_token,
    new_type,
    read_events,
    set_status,
    spawn_entity,
    unique_id,
)
from conftest import (
    SERVER_SCRIPT,
    ServerFactory,
    ServerProcess,
    database_url_for,
    server_environment,
)
from electric_agents.agents.event_source_catalog import (
    CatalogError,
    derive_subscription_id,
    filter_matches,
    parse_catalog,
)

pytestmark = pytest.mark.timeout(120)

DEV_PRINCIPAL = "/principal/system%3Adev-local"
PR_PARAMS_SCHEMA = {
    "type": "object",
    "properties": {"number": {"type": "integer", "minimum": 1}},
    "required": ["number"],
}
GITHUB: dict[str, Any] = {
    "serviceId": "svc-agent-1",
    "sourceKey": "github-repo",
    "sourceType": "webhook",
    "endpointKey": "github-repo",
    "status": "active",
    "label": "GitHub repository",
    "description": "Repository webhooks",
    "agentVisible": True,
    "buckets": [
        {
            "key": "pull_request",
            "label": "Pull request",
            "pathTemplate": "prs/:number",
            "paramsSchema": PR_PARAMS_SCHEMA,
            "eventTypes": ["issue_comment"],
            "filters": [
                {
                    "key": "opened",
                    "label": "Opened",
                    "condition": {"ops": ["insert"], "match": {"body.action": "opened"}},
                },
                {"key": "everything", "label": "Everything"},
            ],
        },
        {
            "key": "branch",
            "label": "Branch",
            "pathTemplate": "branches/:name/:extra",
            "paramsSchema": {"type": "object"},
        },
        {
            "key": "absolute",
            "label": "Absolute",
            "pathTemplate": "/abs/:name",
            "paramsSchema": {"type": "object"},
        },
    ],
    "updatedAt": "2026-05-23T00:00:00.000Z",
    "revision": 7,
}
HIDDEN = {**GITHUB, "sourceKey": "hidden-src", "endpointKey": "hidden", "agentVisible": False}
DISABLED = {**GITHUB, "sourceKey": "disabled-src", "endpointKey": "disabled", "status": "disabled"}
ROOT_ONLY: dict[str, Any] = {
    "sourceKey": "stripe",
    "sourceType": "webhook",
    "endpointKey": "stripe-events",
    "status": "active",
    "label": "Stripe",
    "agentVisible": True,
    "buckets": [],
    "revision": 1,
}
CATALOG = [GITHUB, HIDDEN, DISABLED, ROOT_ONLY]


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("event_sources")
    catalog_file = directory / "event-sources.json"
    catalog_file.write_bytes(orjson.dumps(CATALOG))
    name = f"t_agents_{uuid.uuid4().hex[:12]}"
    pg_server.psql(f"CREATE DATABASE {name};")
    process = ServerProcess(
        "serve",
        log_path=directory / "server.log",
        database_url=database_url_for(pg_server.get_uri(), name),
        extra_args=["--event-sources", str(catalog_file)],
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


class Api:
    def __init__(self, http: httpx.AsyncClient, server: ServerProcess, db: Any) -> None:
        self.http = http
        self.server = server
        self.db = db

    def url(self, path: str) -> str:
        return self.server.origin + path

    async def entity(self) -> str:
        kind = await new_type(self.http, self.server, "t")
        url: str = (await spawn_entity(self.http, self.server, kind))["url"]
        return url

    async def subscribe(self, entity_url: str, sub_id: str, body: Any) -> httpx.Response:
        return await self.http.put(
            self.url(f"/_electric/entities{entity_url}/event-source-subscriptions/{sub_id}"),
            json=body,
        )

    async def unsubscribe(self, entity_url: str, sub_id: str) -> httpx.Response:
        return await self.http.delete(
            self.url(f"/_electric/entities{entity_url}/event-source-subscriptions/{sub_id}")
        )

    async def deliver(self, stream: str, key: str, body: Any) -> None:
        """A webhook delivery as the host writes it: a `webhook_event` row."""
        row = {
            "key": key,
            "body": body,
            "event_type": "issue_comment",
            "endpoint_key": stream.split("/")[2],
            "bucket": None,
            "stream_path": stream,
            "headers": {},
            "received_at": "2026-05-23T00:00:00.000Z",
            "request": {
                "method": "POST",
                "content_type": "application/json",
                "size_bytes": 2,
                "query": {},
            },
        }
        event = {
            "type": "webhook_event",
            "key": key,
            "value": row,
            "headers": {"operation": "insert"},
        }
        response = await self.http.post(self.url(stream), json=event)
        assert response.status_code in (200, 204), (response.status_code, response.text)

    async def events(self, stream: str) -> list[Any]:
        return await read_events(self.http, self.server, stream)

    async def wakes(self, entity_url: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(entity_url + "/main") if e.get("type") == "wake"]

    async def manifests(self, entity_url: str) -> list[dict[str, Any]]:
        return [e for e in await self.events(entity_url + "/main") if e.get("type") == "manifest"]

    async def registrations(self, entity_url: str) -> list[asyncpg.Record]:
        return await self.db.fetch(
            "SELECT source_url, condition::text AS condition, manifest_key"
            " FROM wake_registrations WHERE tenant_id = $1 AND subscriber_url = $2 ORDER BY id",
            TENANT,
            entity_url,
        )


@pytest.fixture
def api(http: httpx.AsyncClient, server: ServerProcess, db: Any) -> Api:
    return Api(http, server, db)


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == code, error
    return str(error["message"])


PR = {"sourceKey": "github-repo", "bucketKey": "pull_request", "params": {"number": 42}}
PR_STREAM = "/_webhooks/github-repo/prs/42"


# --- the catalog ---------------------------------------------------------------------------


async def test_catalog_lists_only_agent_visible_active_sources_as_configured(api: Api) -> None:
    response = await api.http.get(api.url("/_electric/event-sources"))
    assert response.status_code == 200
    assert response.json() == {"eventSources": [GITHUB, ROOT_ONLY]}


# --- PUT: the response, the manifest, the registration --------------------------------------


async def test_subscribe_returns_the_subscription_and_writes_manifest_and_registration(
    api: Api,
) -> None:
    url = await api.entity()
    body = {**PR, "lifetime": {"kind": "manual"}, "reason": "Watch PR 42"}
    response = await api.subscribe(url, "pr-42", body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert list(result) == ["txid", "subscription"]
    uuid.UUID(result["txid"])
    subscription = result["subscription"]
    assert list(subscription) == [
        "id",
        "entityUrl",
        "sourceKey",
        "bucketKey",
        "params",
        "filterApplied",
        "contractRevision",
        "sourceUrl",
        "sourceType",
        "manifestKey",
        "lifetime",
        "reason",
        "createdBy",
        "createdAt",
    ]
    created_at = subscription.pop("createdAt")
    assert datetime.fromisoformat(created_at).tzinfo is not None and created_at.endswith("Z")
    assert subscription == {
        "id": "pr-42",
        "entityUrl": url,
        "sourceKey": "github-repo",
        "bucketKey": "pull_request",
        "params": {"number": 42},
        "filterApplied": False,
        "contractRevision": 7,
        "sourceUrl": PR_STREAM,
        "sourceType": "webhook",
        "manifestKey": "event-source:pr-42",
        "lifetime": {"kind": "manual"},
        "reason": "Watch PR 42",
        "createdBy": "tool",
    }

    [manifest] = await api.manifests(url)
    assert list(manifest) == ["type", "key", "headers", "value"]
    assert manifest["key"] == "event-source:pr-42"
    assert manifest["headers"]["operation"] == "upsert"
    assert manifest["headers"]["txid"] == result["txid"]
    assert manifest["value"] == {
        "key": "event-source:pr-42",
        "kind": "source",
        "sourceType": "webhook",
        "sourceRef": "github-repo/prs/42",
        "config": {
            "endpointKey": "github-repo",
            "streamUrl": PR_STREAM,
            "bucket": "prs/42",
            "eventSource": {
                "id": "pr-42",
                "sourceKey": "github-repo",
                "bucketKey": "pull_request",
                "params": {"number": 42},
                "filterApplied": False,
                "contractRevision": 7,
                "lifetime": {"kind": "manual"},
                "reason": "Watch PR 42",
                "createdBy": "tool",
                "createdAt": created_at,
            },
        },
        "wake": {"on": "change", "collections": ["webhook_event"], "ops": ["insert"]},
    }
    [registration] = await api.registrations(url)
    assert registration["source_url"] == PR_STREAM
    assert registration["manifest_key"] == "event-source:pr-42"
    assert orjson.loads(registration["condition"]) == {
        "on": "change",
        "collections": ["webhook_event"],
        "ops": ["insert"],
    }
    # The webhook stream exists, ready for deliveries.
    head = await api.http.head(api.url(PR_STREAM))
    assert head.status_code == 200
    assert head.headers["content-type"].startswith("application/json")


async def test_root_subscription_defaults_lifetime_and_omits_optional_keys(api: Api) -> None:
    url = await api.entity()
    response = await api.subscribe(url, "stripe-all", {"sourceKey": "stripe"})
    assert response.status_code == 200, response.text
    subscription = response.json()["subscription"]
    assert "bucketKey" not in subscription and "filterKey" not in subscription
    assert "reason" not in subscription
    assert subscription["params"] == {}
    assert subscription["lifetime"] == {"kind": "until_entity_stopped"}
    assert subscription["sourceUrl"] == "/_webhooks/stripe-events"
    [manifest] = await api.manifests(url)
    assert manifest["value"]["sourceRef"] == "stripe-events"
    assert "bucket" not in manifest["value"]["config"]


async def test_resubscribing_replaces_the_one_registration(api: Api) -> None:
    url = await api.entity()
    assert (await api.subscribe(url, "s", PR)).status_code == 200
    other = {**PR, "params": {"number": 7}}
    assert (await api.subscribe(url, "s", other)).status_code == 200
    registrations = await api.registrations(url)
    assert [r["source_url"] for r in registrations] == ["/_webhooks/github-repo/prs/7"]
    assert [m["headers"]["operation"] for m in await api.manifests(url)] == ["upsert", "upsert"]


async def test_subscription_id_is_percent_decoded_from_the_path(api: Api) -> None:
    url = await api.entity()
    response = await api.subscribe(url, "pr%3A42", PR)
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["manifestKey"] == "event-source:pr:42"


# --- PUT: every refusal ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            {"sourceKey": "hidden-src"}, 'Event source "hidden-src" is not active', id="hidden"
        ),
        pytest.param(
            {"sourceKey": "disabled-src"}, 'Event source "disabled-src" is not active', id="off"
        ),
        pytest.param(
            {**PR, "bucketKey": "issues"},
            'Unknown bucket "issues" for event source "github-repo"',
            id="unknown-bucket",
        ),
        pytest.param(
            {**PR, "filterKey": "closed"},
            'Unknown filter "closed" for event source "github-repo"',
            id="unknown-filter",
        ),
        pytest.param(
            {"sourceKey": "github-repo", "filterKey": "opened"},
            'Unknown filter "opened" for event source "github-repo"',
            id="filter-without-bucket",
        ),
        pytest.param(
            {**PR, "params": {}},
            'Bucket params do not match paramsSchema for "pull_request": '
            "/number must have required property 'number'",
            id="params-missing",
        ),
        pytest.param(
            {**PR, "params": {"number": "x"}},
            'Bucket params do not match paramsSchema for "pull_request": /number must be integer',
            id="params-type",
        ),
        pytest.param(
            {**PR, "params": {"number": 0}},
            'Bucket params do not match paramsSchema for "pull_request": /number must be >= 1',
            id="params-minimum",
        ),
        pytest.param(
            {"sourceKey": "github-repo", "bucketKey": "branch", "params": {"name": "main"}},
            "Missing bucket parameter: extra",
            id="missing-parameter",
        ),
        pytest.param(
            {
                "sourceKey": "github-repo",
                "bucketKey": "branch",
                "params": {"name": {"a": 1}, "extra": "x"},
            },
            'Bucket parameter "name" must be a scalar value',
            id="object-parameter",
        ),
        pytest.param(
            {"sourceKey": "github-repo", "bucketKey": "branch", "params": {"name": "", "extra": 1}},
            'Bucket parameter "name" must not be empty',
            id="empty-parameter",
        ),
        pytest.param(
            {"sourceKey": "github-repo", "bucketKey": "absolute", "params": {"name": "a"}},
            "Invalid bucket path template: /abs/:name",
            id="absolute-template",
        ),
        pytest.param(
            {
                "sourceKey": "github-repo",
                "bucketKey": "branch",
                "params": {"name": "a b", "extra": 1},
            },
            "[agent-runtime] webhook bucket must use non-empty URL-safe path segments",
            id="encoded-segment",
        ),
        pytest.param(
            {**PR, "lifetime": {"kind": "expires_at", "at": "next tuesday"}},
            "Invalid expires_at lifetime timestamp",
            id="expires-at",
        ),
    ],
)
async def test_resolution_errors_are_400_with_the_runtime_message(
    api: Api, body: dict[str, Any], message: str
) -> None:
    url = await api.entity()
    response = await api.subscribe(url, "s1", body)
    assert error_of(response, 400, "INVALID_REQUEST") == message
    # Nothing was written.
    assert await api.manifests(url) == []
    assert await api.registrations(url) == []


async def test_an_oversized_subscription_id_is_refused_and_nothing_is_written(api: Api) -> None:
    url = await api.entity()
    # Random, so the index entry cannot be compressed below Postgres' limit.
    response = await api.subscribe(url, "".join(uuid.uuid4().hex for _ in range(200)), PR)
    assert error_of(response, 400, "INVALID_REQUEST") == "Wake registration is too large"
    assert await api.manifests(url) == []
    assert await api.registrations(url) == []


async def test_non_ascii_bucket_parameters_are_refused_like_the_runtime(api: Api) -> None:
    url = await api.entity()
    body = {"sourceKey": "github-repo", "bucketKey": "branch", "params": {"name": "é", "extra": 1}}
    response = await api.subscribe(url, "s1", body)
    assert error_of(response, 400, "INVALID_REQUEST") == (
        "[agent-runtime] webhook bucket must use non-empty URL-safe path segments"
    )
    ok = {
        "sourceKey": "github-repo",
        "bucketKey": "branch",
        "params": {"name": "a.b~c", "extra": 2.0},
    }
    response = await api.subscribe(url, "s2", ok)
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["sourceUrl"] == "/_webhooks/github-repo/branches/a.b~c/2"


async def test_unknown_source_is_404(api: Api) -> None:
    url = await api.entity()
    response = await api.subscribe(url, "s1", {"sourceKey": "gitlab"})
    assert error_of(response, 404, "NOT_FOUND") == 'Event source "gitlab" not found'


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="no-source-key"),
        pytest.param({"sourceKey": 5}, id="source-key-number"),
        pytest.param({**PR, "params": [1]}, id="params-array"),
        pytest.param({**PR, "lifetime": {"kind": "forever"}}, id="lifetime-kind"),
        pytest.param({**PR, "lifetime": {"kind": "expires_at"}}, id="expires-at-without-at"),
        pytest.param({**PR, "reason": 3}, id="reason-number"),
    ],
)
async def test_body_schema_mismatch_is_400(api: Api, body: dict[str, Any]) -> None:
    url = await api.entity()
    response = await api.subscribe(url, "s1", body)
    assert error_of(response, 400, "INVALID_REQUEST") == "Request body does not match API schema"
    assert response.json()["error"]["details"]


async def test_invalid_json_body_is_400(api: Api) -> None:
    url = await api.entity()
    response = await api.http.put(
        api.url(f"/_electric/entities{url}/event-source-subscriptions/s1"),
        content=b"{nope",
        headers={"Content-Type": "application/json"},
    )
    assert error_of(response, 400, "INVALID_REQUEST") == "Invalid JSON body"


async def test_principal_entities_refuse_subscriptions(api: Api) -> None:
    response = await api.subscribe(DEV_PRINCIPAL, "s1", PR)
    assert error_of(response, 400, "INVALID_REQUEST") == (
        "Principal entities are built in and cannot be subscribed to event sources"
    )
    response = await api.unsubscribe(DEV_PRINCIPAL, "s1")
    assert error_of(response, 400, "INVALID_REQUEST") == (
        "Principal entities are built in and cannot be unsubscribed from event sources"
    )


async def test_missing_entity_and_unknown_type_are_404(api: Api) -> None:
    url = await api.entity()
    type_name = url.split("/")[1]
    response = await api.subscribe(f"/{type_name}/nobody", "s1", PR)
    assert error_of(response, 404, "NOT_FOUND") == f"Entity not found at /{type_name}/nobody"
    response = await api.unsubscribe("/no_such_type/x", "s1")
    error_of(response, 404, "UNKNOWN_ENTITY_TYPE")


async def test_stopped_entity_refuses_subscription_changes(api: Api) -> None:
    url = await api.entity()
    await set_status(api.db, url, "stopped")
    error_of(await api.subscribe(url, "s1", PR), 409, "NOT_RUNNING")
    error_of(await api.unsubscribe(url, "s1"), 409, "NOT_RUNNING")


# --- wakes ----------------------------------------------------------------------------------


async def test_webhook_append_wakes_the_subscriber_with_an_ordinary_wake(api: Api) -> None:
    url = await api.entity()
    assert (await api.subscribe(url, "pr", PR)).status_code == 200
    await api.deliver(PR_STREAM, "evt-1", {"action": "created"})
    # Wakes commit with the append, so they are there once the append is acknowledged.
    [wake] = await api.wakes(url)
    assert wake["key"].startswith("wake-") and wake["key"].endswith("-insert:evt-1")
    assert wake["headers"]["operation"] == "insert"
    value = wake["value"]
    assert value["source"] == PR_STREAM
    assert value["timeout"] is False
    assert value["changes"] == [{"collection": "webhook_event", "kind": "insert", "key": "evt-1"}]
    # Another bucket's stream does not wake it.
    other = {**PR, "params": {"number": 43}}
    second = await api.entity()
    assert (await api.subscribe(second, "pr", other)).status_code == 200
    await api.deliver("/_webhooks/github-repo/prs/43", "evt-2", {})
    assert len(await api.wakes(url)) == 1
    assert len(await api.wakes(second)) == 1


async def test_two_subscribers_of_one_stream_are_both_woken(api: Api) -> None:
    first, second = await api.entity(), await api.entity()
    stream = "/_webhooks/github-repo/prs/77"
    for url in (first, second):
        body = {**PR, "params": {"number": 77}}
        assert (await api.subscribe(url, "pr", body)).status_code == 200
    await api.deliver(stream, "evt-1", {})
    assert len(await api.wakes(first)) == 1
    assert len(await api.wakes(second)) == 1


async def test_delete_stops_wakes_and_writes_the_manifest_delete(api: Api) -> None:
    url = await api.entity()
    assert (await api.subscribe(url, "pr", PR)).status_code == 200
    response = await api.unsubscribe(url, "pr")
    assert response.status_code == 200, response.text
    assert list(response.json()) == ["txid"]
    txid = response.json()["txid"]
    uuid.UUID(txid)
    assert await api.registrations(url) == []
    last = (await api.manifests(url))[-1]
    assert list(last) == ["type", "key", "headers"]  # no value
    assert last["key"] == "event-source:pr"
    headers = last["headers"]
    assert (headers["operation"], headers["txid"]) == ("delete", txid)
    assert headers["timestamp"].endswith("Z")
    await api.deliver(PR_STREAM, f"evt-{uuid.uuid4().hex[:6]}", {})
    assert await api.wakes(url) == []
    # Deleting again (or an unknown id) is idempotent.
    assert (await api.unsubscribe(url, "pr")).status_code == 200
    assert (await api.unsubscribe(url, "never")).status_code == 200


async def test_filter_applies_its_condition_to_webhook_events(api: Api) -> None:
    url = await api.entity()
    stream = "/_webhooks/github-repo/prs/501"
    body = {**PR, "params": {"number": 501}, "filterKey": "opened"}
    response = await api.subscribe(url, "opened", body)
    assert response.status_code == 200, response.text
    subscription = response.json()["subscription"]
    assert subscription["filterKey"] == "opened"
    assert subscription["filterApplied"] is True
    [manifest] = await api.manifests(url)
    assert manifest["value"]["config"]["eventSource"]["filterApplied"] is True
    await api.deliver(stream, "closed-1", {"action": "closed"})
    await api.deliver(stream, "no-action", {"other": 1})
    assert await api.wakes(url) == []
    await api.deliver(stream, "opened-1", {"action": "opened"})
    [wake] = await api.wakes(url)
    assert wake["value"]["changes"][0]["key"] == "opened-1"


async def test_filter_without_condition_is_not_applied(api: Api) -> None:
    url = await api.entity()
    body = {**PR, "params": {"number": 502}, "filterKey": "everything"}
    response = await api.subscribe(url, "all", body)
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["filterApplied"] is False
    await api.deliver("/_webhooks/github-repo/prs/502", "any-1", {"action": "closed"})
    assert len(await api.wakes(url)) == 1


async def test_expires_at_lifetime_removes_the_subscription_at_that_time(api: Api) -> None:
    url = await api.entity()
    stream = "/_webhooks/github-repo/prs/600"
    at = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat().replace("+00:00", "Z")
    body = {**PR, "params": {"number": 600}, "lifetime": {"kind": "expires_at", "at": at}}
    response = await api.subscribe(url, "brief", body)
    assert response.status_code == 200, response.text
    assert response.json()["subscription"]["lifetime"] == {"kind": "expires_at", "at": at}
    await api.deliver(stream, "before", {})
    assert len(await api.wakes(url)) == 1

    async def expired() -> bool:
        return await api.registrations(url) == []

    await eventually(expired, "the subscription to expire")
    assert datetime.now(UTC) >= datetime.fromisoformat(at)

    async def deleted() -> bool:
        manifests = await api.manifests(url)
        return manifests[-1]["headers"]["operation"] == "delete"

    await eventually(deleted, "the manifest delete")
    await api.deliver(stream, "after", {})
    assert [w["value"]["changes"][0]["key"] for w in await api.wakes(url)] == ["before"]


async def test_expiry_waits_for_a_locked_owner_instead_of_blocking(api: Api) -> None:
    url = await api.entity()
    at = (datetime.now(UTC) + timedelta(seconds=0.5)).isoformat()
    body = {**PR, "params": {"number": 603}, "lifetime": {"kind": "expires_at", "at": at}}
    assert (await api.subscribe(url, "locked", body)).status_code == 200
    assert api.server.database_url is not None
    holder = await asyncpg.connect(api.server.database_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM entities WHERE tenant_id = $1 AND url = $2 FOR UPDATE", TENANT, url
            )

            async def refused() -> bool:
                error = await api.db.fetchval(
                    "SELECT last_error FROM scheduled_tasks WHERE kind = 'event_source_expiry'"
                    " AND owner_entity_url = $1",
                    url,
                )
                return error is not None and "OWNER_BUSY" in error

            await eventually(refused, "the expiry to find its owner locked")
            assert len(await api.registrations(url)) == 1
    finally:
        await holder.close()

    async def expired() -> bool:
        return await api.registrations(url) == []

    await eventually(expired, "the retried expiry")


async def test_resubscribing_without_expiry_cancels_the_pending_expiry(api: Api) -> None:
    url = await api.entity()
    at = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    body = {**PR, "params": {"number": 601}, "lifetime": {"kind": "expires_at", "at": at}}
    assert (await api.subscribe(url, "s", body)).status_code == 200
    manual = {**PR, "params": {"number": 601}, "lifetime": {"kind": "manual"}}
    assert (await api.subscribe(url, "s", manual)).status_code == 200
    pending = await api.db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE kind = 'event_source_expiry'"
        " AND owner_entity_url = $1 AND completed_at IS NULL",
        url,
    )
    assert pending == 0
    assert len(await api.registrations(url)) == 1


async def test_expiry_of_a_past_time_removes_it_right_away(api: Api) -> None:
    url = await api.entity()
    body = {**PR, "params": {"number": 602}, "lifetime": {"kind": "expires_at", "at": "2020-01-01"}}
    assert (await api.subscribe(url, "old", body)).status_code == 200

    async def expired() -> bool:
        return await api.registrations(url) == []

    await eventually(expired, "the subscription to expire")


async def test_junk_filter_in_a_client_wake_condition_does_not_break_appends(api: Api) -> None:
    url = await api.entity()
    stream = "/_webhooks/github-repo/prs/800"
    assert (
        await api.http.put(api.url(stream), headers={"Content-Type": "application/json"})
    ).status_code == 201
    response = await api.http.post(
        api.url("/_electric/wake"),
        json={
            "subscriberUrl": url,
            "sourceUrl": stream,
            "condition": {"on": "change", "filter": {"ops": 5, "match": [1]}},
        },
    )
    assert response.status_code == 204, response.text
    await api.deliver(stream, "evt-1", {})
    assert len(await api.wakes(url)) == 1


async def test_terminal_entity_loses_its_subscriptions(api: Api) -> None:
    url = await api.entity()
    for sub_id, lifetime in (("a", "until_entity_stopped"), ("b", "manual")):
        body = {**PR, "params": {"number": 700}, "lifetime": {"kind": lifetime}}
        assert (await api.subscribe(url, sub_id, body)).status_code == 200
    assert len(await api.registrations(url)) == 2
    response = await api.http.post(
        api.url(f"/_electric/entities{url}/signal"), json={"signal": "SIGKILL"}
    )
    assert response.status_code == 200, response.text
    assert await api.registrations(url) == []
    # Deliveries after that are still accepted, and wake nobody.
    await api.deliver("/_webhooks/github-repo/prs/700", "late", {})


async def test_handler_manifest_for_a_webhook_without_stream_url_registers_the_derived_path(
    api: Api,
) -> None:
    url = await api.entity()
    token = await mint_token(api.db, url)
    entry = {
        "type": "manifest",
        "key": "source:webhook:hooks/b1",
        "headers": {"operation": "upsert"},
        "value": {
            "key": "source:webhook:hooks/b1",
            "kind": "source",
            "sourceType": "webhook",
            "sourceRef": "hooks/b1",
            "config": {"endpointKey": "hooks", "bucket": "/b1/"},
            "wake": {"on": "change", "collections": ["webhook_event"], "ops": ["insert"]},
        },
    }
    response = await api.http.post(
        api.url(url + "/main"),
        content=orjson.dumps(entry),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert response.status_code in (200, 204), response.text
    [registration] = await api.registrations(url)
    assert registration["source_url"] == "/_webhooks/hooks/b1"


async def test_handler_rewriting_a_filtered_entry_keeps_the_filter(api: Api) -> None:
    url = await api.entity()
    stream = "/_webhooks/github-repo/prs/503"
    body = {**PR, "params": {"number": 503}, "filterKey": "opened"}
    assert (await api.subscribe(url, "f", body)).status_code == 200
    [manifest] = await api.manifests(url)
    [before] = await api.registrations(url)
    # The runtime writes the same entry back through the proxy (manifest replay).
    token = await mint_token(api.db, url)
    echo = {
        "type": "manifest",
        "key": manifest["key"],
        "headers": {"operation": "upsert"},
        "value": manifest["value"],
    }
    response = await api.http.post(
        api.url(url + "/main"),
        content=orjson.dumps(echo),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert response.status_code in (200, 204), response.text
    [after] = await api.registrations(url)
    assert orjson.loads(after["condition"]) == orjson.loads(before["condition"])
    assert orjson.loads(after["condition"])["filter"] == {
        "ops": ["insert"],
        "match": {"body.action": "opened"},
    }
    await api.deliver(stream, "closed-1", {"action": "closed"})
    assert await api.wakes(url) == []


async def test_a_handler_written_entry_with_expires_at_expires_too(api: Api) -> None:
    """The manifest is the source of truth: an `expires_at` lifetime in an entry the
    handler wrote through the stream ends the subscription as the route's would."""
    url = await api.entity()
    token = await mint_token(api.db, url)
    at = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    key = "event-source:handmade"
    entry = {
        "type": "manifest",
        "key": key,
        "headers": {"operation": "upsert"},
        "value": {
            "key": key,
            "kind": "source",
            "sourceType": "webhook",
            "sourceRef": "hooks/h1",
            "config": {
                "endpointKey": "hooks",
                "streamUrl": "/_webhooks/hooks/h1",
                "eventSource": {"id": "handmade", "lifetime": {"kind": "expires_at", "at": at}},
            },
            "wake": {"on": "change", "collections": ["webhook_event"], "ops": ["insert"]},
        },
    }
    response = await api.http.post(
        api.url(url + "/main"),
        content=orjson.dumps(entry),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert response.status_code in (200, 204), response.text
    [registration] = await api.registrations(url)
    assert registration["manifest_key"] == key

    async def expired() -> bool:
        return await api.registrations(url) == []

    await eventually(expired, "the handler-written subscription to expire")
    operations = [m["headers"]["operation"] for m in await api.manifests(url)]
    assert operations == ["upsert", "delete"]


# --- no catalog, bad catalogs ----------------------------------------------------------------


async def test_without_a_catalog_the_list_is_empty_and_subscribing_is_404(
    server_factory: ServerFactory,
) -> None:
    plain = server_factory("serve")
    async with httpx.AsyncClient(timeout=30.0) as http:
        response = await http.get(f"{plain.origin}/_electric/event-sources")
        assert response.status_code == 200
        assert response.json() == {"eventSources": []}
        type_name = unique_id("t").replace("-", "_")
        response = await http.post(
            f"{plain.origin}/_electric/entity-types", json={"name": type_name, "description": "t"}
        )
        assert response.status_code == 201
        url = f"/{type_name}/{unique_id()}"
        assert (
            await http.put(f"{plain.origin}/_electric/entities{url}", json={})
        ).status_code == 201
        response = await http.put(
            f"{plain.origin}/_electric/entities{url}/event-source-subscriptions/s1", json=PR
        )
        assert error_of(response, 404, "NOT_FOUND") == "No event source catalog is configured"


def _run_serve(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(SERVER_SCRIPT), "serve", "--port", "0", *args],
        cwd=cwd,
        env=server_environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("electric-agents: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(b"{not json", "is not JSON", id="not-json"),
        pytest.param(b'{"sourceKey": "x"}', "expected a JSON list", id="not-a-list"),
        pytest.param(
            orjson.dumps([{k: v for k, v in ROOT_ONLY.items() if k != "endpointKey"}]),
            "must have required property 'endpointKey'",
            id="missing-endpoint-key",
        ),
        pytest.param(
            orjson.dumps([{**ROOT_ONLY, "endpointKey": "Bad Key"}]),
            "/0/endpointKey",
            id="bad-endpoint-key",
        ),
        pytest.param(
            orjson.dumps([{**ROOT_ONLY, "sourceType": "email"}]), "/0/sourceType", id="type"
        ),
        pytest.param(
            orjson.dumps([ROOT_ONLY, ROOT_ONLY]), 'duplicate sourceKey "stripe"', id="dup"
        ),
        pytest.param(
            orjson.dumps(
                [
                    {
                        **ROOT_ONLY,
                        "buckets": [
                            {
                                "key": "b",
                                "label": "B",
                                "pathTemplate": "b",
                                "paramsSchema": {"type": "nonsense"},
                            }
                        ],
                    }
                ]
            ),
            'bucket "b" of "stripe"',
            id="bad-params-schema",
        ),
        pytest.param(
            orjson.dumps(
                [
                    {
                        **ROOT_ONLY,
                        "buckets": [
                            {
                                "key": "b",
                                "label": "B",
                                "pathTemplate": "b",
                                "paramsSchema": {},
                                "filters": [
                                    {
                                        "key": "f",
                                        "label": "F",
                                        "condition": {
                                            "where": {"language": "cel", "expression": "true"}
                                        },
                                    }
                                ],
                            }
                        ],
                    }
                ]
            ),
            "(CEL) is not supported",
            id="cel-filter",
        ),
    ],
)
def test_bad_catalog_file_exits_2_with_one_line_error(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_bytes(content)
    line = _run_serve(["--event-sources", str(catalog_file)], tmp_path)
    assert expected in line, line


def test_missing_catalog_file_from_the_environment_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    line = _run_serve([], tmp_path, {"ELECTRIC_AGENTS_EVENT_SOURCES": str(missing)})
    assert "cannot read event sources file" in line and str(missing) in line


# --- pure parts ------------------------------------------------------------------------------


def test_catalog_parsing_accepts_the_reference_contract_shape() -> None:
    catalog = parse_catalog(CATALOG)
    assert catalog.visible() == [GITHUB, ROOT_ONLY]
    assert catalog.get("hidden-src") == HIDDEN
    assert catalog.get("nope") is None
    with pytest.raises(CatalogError):
        parse_catalog([{**ROOT_ONLY, "revision": "7"}])


def test_derived_subscription_ids_are_stable_and_normalized() -> None:
    first = derive_subscription_id("GitHub Repo", "pull_request", {"b": 1, "a": [1, 2]}, None)
    again = derive_subscription_id("GitHub Repo", "pull_request", {"a": [1, 2], "b": 1}, None)
    assert first == again
    prefix, _, digest = first.rpartition("-")
    assert prefix == "github-repo-pull_request"
    assert digest and all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in digest)
    assert derive_subscription_id("s", None, {}, None).startswith("s-root-")
    assert derive_subscription_id("s", "b", {"n": 2}, None) != derive_subscription_id(
        "s", "b", {"n": 3}, None
    )


@pytest.mark.parametrize(
    ("condition", "event", "kind", "expected"),
    [
        (
            {"match": {"body.action": "opened"}},
            {"value": {"body": {"action": "opened"}}},
            "insert",
            True,
        ),
        (
            {"match": {"body.action": "opened"}},
            {"value": {"body": {"action": "closed"}}},
            "insert",
            False,
        ),
        ({"match": {"body.n": 1}}, {"value": {"body": {"n": 1.0}}}, "insert", True),
        ({"match": {"body.n": 1}}, {"value": {"body": {"n": True}}}, "insert", False),
        (
            {"match": {"body.items.1": "b"}},
            {"value": {"body": {"items": ["a", "b"]}}},
            "insert",
            True,
        ),
        ({"match": {"body.missing": None}}, {"value": {"body": {}}}, "insert", False),
        ({"ops": ["update"]}, {"value": {}}, "insert", False),
        ({"collections": ["other"]}, {"type": "webhook_event", "value": {}}, "insert", False),
        ({"collections": ["webhook_event"]}, {"type": "webhook_event"}, "insert", True),
        (
            {"collections": "webhook", "ops": 5, "match": "x"},
            {"type": "webhook_event"},
            "insert",
            True,
        ),
        ({"match": {"a": 1}}, {"value": [{"a": 1}]}, "insert", False),
        ({"match": {"0.a": 1}}, {"value": [{"a": 1}]}, "insert", True),
    ],
)
def test_filter_conditions(
    condition: dict[str, Any], event: dict[str, Any], kind: str, expected: bool
) -> None:
    assert filter_matches(condition, event, kind) is expected


# --- crashes, concurrency, several processes -------------------------------------------------


def catalog_args(tmp_path: Path) -> list[str]:
    catalog_file = tmp_path / "event-sources.json"
    catalog_file.write_bytes(orjson.dumps(CATALOG))
    return ["--event-sources", str(catalog_file)]


async def test_expiry_survives_kill9_and_fires_once_across_two_processes(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    args = catalog_args(tmp_path)
    first = server_factory("serve", extra_args=args)
    assert first.database_url is not None
    conn = await asyncpg.connect(first.database_url)
    try:
        async with httpx.AsyncClient(timeout=30.0) as http:
            api = Api(http, first, conn)
            url = await api.entity()
            at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
            body = {**PR, "lifetime": {"kind": "expires_at", "at": at}}
            assert (await api.subscribe(url, "brief", body)).status_code == 200
            # The process that scheduled it dies before the time comes.
            first.kill9()
            first.start()
            second = server_factory("serve", extra_args=args)
            api.server = second

            async def expired() -> bool:
                return await api.registrations(url) == []

            await eventually(expired, "the subscription to expire after kill -9")

            async def settled() -> bool:
                return (
                    await conn.fetchval(
                        "SELECT count(*) FROM scheduled_tasks WHERE kind = 'event_source_expiry'"
                        " AND owner_entity_url = $1 AND completed_at IS NULL",
                        url,
                    )
                    == 0
                )

            await eventually(settled, "the expiry task to complete")
            operations = [m["headers"]["operation"] for m in await api.manifests(url)]
            assert operations == ["upsert", "delete"]
    finally:
        await conn.close()


async def test_concurrent_upserts_and_deletes_of_one_subscription_stay_consistent(api: Api) -> None:
    url = await api.entity()
    at = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    async def put(number: int) -> httpx.Response:
        body = {**PR, "params": {"number": number}, "lifetime": {"kind": "expires_at", "at": at}}
        return await api.subscribe(url, "busy", body)

    responses = await asyncio.gather(
        *(put(n) for n in range(1, 9)), api.unsubscribe(url, "busy"), api.unsubscribe(url, "busy")
    )
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    manifests = await api.manifests(url)
    assert len(manifests) == 10
    registrations = await api.registrations(url)
    pending = await api.db.fetchval(
        "SELECT count(*) FROM scheduled_tasks WHERE kind = 'event_source_expiry'"
        " AND owner_entity_url = $1 AND completed_at IS NULL",
        url,
    )
    # The last write decides: an upsert leaves one registration and one expiry, a delete
    # neither.
    if manifests[-1]["headers"]["operation"] == "delete":
        assert (registrations, pending) == ([], 0)
    else:
        bucket = manifests[-1]["value"]["config"]["bucket"]
        assert [r["source_url"] for r in registrations] == [f"/_webhooks/github-repo/{bucket}"]
        assert pending == 1

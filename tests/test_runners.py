"""Runners, the pull-wake workers (spec/02 §3.5, spec/03 §5.14), over HTTP against a real
`electric-agents serve` process and its PostgreSQL.

The health report's claim and dispatch inputs are seeded directly in the database here;
tests/test_runner_claims.py makes them through real claims.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from agents_support import TENANT, attach_log, module_serve_server, unique_id
from conftest import ServerProcess

pytestmark = pytest.mark.timeout(120)

ALICE = {"electric-principal": "user:alice"}
BOB = {"electric-principal": "user:bob"}
ALICE_URL = "/principal/user%3Aalice"
BOB_URL = "/principal/user%3Abob"
RUNNER_KEYS = [
    "id",
    "owner_principal",
    "label",
    "kind",
    "admin_status",
    "wake_stream",
    "created_at",
    "updated_at",
]


@pytest.fixture(scope="module")
def server(pg_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from module_serve_server(pg_server, tmp_path_factory.mktemp("runners"))


@pytest.fixture
async def http(
    server: ServerProcess, request: pytest.FixtureRequest
) -> AsyncIterator[httpx.AsyncClient]:
    attach_log(request, server)
    async with httpx.AsyncClient(base_url=server.origin, timeout=30.0) as client:
        yield client


async def register(
    http: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str] = ALICE
) -> httpx.Response:
    return await http.post("/_electric/runners", json=body, headers=headers)


async def registered(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """A runner owned by alice; returns its Runner document."""
    body = {"id": unique_id("r"), "label": "laptop", **fields}
    response = await register(http, body)
    assert response.status_code == 201, response.text
    runner: dict[str, Any] = response.json()
    return runner


def assert_error(response: httpx.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["message"]) == (code, message)


def parse_iso(value: str) -> datetime:
    assert value.endswith("Z") and len(value) == 24, value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- register -------------------------------------------------------------------------------


async def test_register_defaults_owner_kind_status_and_wake_stream(http: httpx.AsyncClient) -> None:
    runner_id = unique_id("r")
    response = await register(http, {"id": runner_id, "label": "laptop"})
    assert response.status_code == 201, response.text
    runner = response.json()
    assert list(runner) == RUNNER_KEYS
    assert runner["id"] == runner_id
    assert runner["owner_principal"] == ALICE_URL
    assert runner["label"] == "laptop"
    assert runner["kind"] == "local"
    assert runner["admin_status"] == "enabled"
    assert runner["wake_stream"] == f"/runners/{runner_id}/wake"
    parse_iso(runner["created_at"])
    parse_iso(runner["updated_at"])


async def test_register_creates_the_wake_stream_as_json(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    head = await http.head(runner["wake_stream"])
    assert head.status_code == 200
    assert head.headers["Content-Type"].startswith("application/json")


async def test_register_with_a_custom_wake_stream_creates_it(http: httpx.AsyncClient) -> None:
    wake_stream = f"/custom/{unique_id('w')}"
    runner = await registered(http, wake_stream=wake_stream, kind="ci", admin_status="disabled")
    assert (runner["wake_stream"], runner["kind"], runner["admin_status"]) == (
        wake_stream,
        "ci",
        "disabled",
    )
    assert (await http.head(wake_stream)).status_code == 200


async def test_reregister_overwrites_fields_and_keeps_created_at(http: httpx.AsyncClient) -> None:
    first = await registered(http)
    response = await register(
        http, {"id": first["id"], "label": "renamed", "kind": "sandbox", "admin_status": "disabled"}
    )
    assert response.status_code == 201, response.text
    second = response.json()
    assert (second["label"], second["kind"], second["admin_status"]) == (
        "renamed",
        "sandbox",
        "disabled",
    )
    assert second["created_at"] == first["created_at"]
    assert parse_iso(second["updated_at"]) >= parse_iso(first["updated_at"])


@pytest.mark.parametrize(
    "owner", [ALICE_URL, "/principal/user:alice"], ids=["encoded", "legacy-unencoded"]
)
async def test_register_accepts_the_callers_principal_url_as_owner(
    http: httpx.AsyncClient, owner: str
) -> None:
    runner = await registered(http, owner_principal=owner)
    assert runner["owner_principal"] == ALICE_URL


@pytest.mark.parametrize("owner", ["user:alice", "alice", "/principal/", "/principal/a/b"])
async def test_register_with_a_malformed_owner_principal_is_400(
    http: httpx.AsyncClient, owner: str
) -> None:
    response = await register(http, {"id": unique_id("r"), "label": "x", "owner_principal": owner})
    assert_error(
        response,
        400,
        "INVALID_REQUEST",
        "owner_principal must be a valid principal URL (e.g. /principal/user%3Aalice), "
        f"got: {owner}",
    )


async def test_register_for_another_owner_is_403(http: httpx.AsyncClient) -> None:
    response = await register(
        http, {"id": unique_id("r"), "label": "x", "owner_principal": BOB_URL}
    )
    assert_error(
        response, 403, "UNAUTHORIZED", "owner_principal must match the authenticated principal"
    )


async def test_reregister_of_someone_elses_runner_is_403_and_changes_nothing(
    http: httpx.AsyncClient,
) -> None:
    runner = await registered(http)
    response = await register(http, {"id": runner["id"], "label": "stolen"}, headers=BOB)
    assert_error(response, 403, "UNAUTHORIZED", "Runner access requires the authenticated owner")
    again = await http.get(f"/_electric/runners/{runner['id']}", headers=ALICE)
    assert again.json() == runner


async def test_register_with_a_wake_stream_of_another_runner_is_400(
    http: httpx.AsyncClient,
) -> None:
    first = await registered(http)
    response = await register(
        http, {"id": unique_id("r"), "label": "x", "wake_stream": first["wake_stream"]}
    )
    assert_error(
        response,
        400,
        "INVALID_REQUEST",
        f'wake_stream "{first["wake_stream"]}" is already used by another runner',
    )


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"label": "x"}, "/"),
        ({"id": "r"}, "/"),
        ({"id": 1, "label": "x"}, "/id"),
        ({"id": "", "label": "x"}, "/id"),
        ({"id": "r", "label": 2}, "/label"),
        ({"id": "r", "label": "x", "kind": "mainframe"}, "/kind"),
        ({"id": "r", "label": "x", "admin_status": "paused"}, "/admin_status"),
        ({"id": "r", "label": "x", "wake_stream": ""}, "/wake_stream"),
        ({"id": "r", "label": "x", "owner_principal": 5}, "/owner_principal"),
        ([], "/"),
    ],
    ids=[
        "no-id",
        "no-label",
        "id-number",
        "id-empty",
        "label-number",
        "bad-kind",
        "bad-admin-status",
        "empty-wake-stream",
        "owner-number",
        "array",
    ],
)
async def test_register_with_a_body_off_schema_is_400_with_details(
    http: httpx.AsyncClient, body: Any, path: str
) -> None:
    response = await register(http, body)
    assert_error(response, 400, "INVALID_REQUEST", "Request body does not match API schema")
    assert path in [detail["path"] for detail in response.json()["error"]["details"]]


async def test_register_with_invalid_json_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/_electric/runners", content=b"{nope", headers=ALICE)
    assert_error(response, 400, "INVALID_REQUEST", "Invalid JSON body")


async def test_register_onto_an_incompatible_existing_stream_is_409_and_stores_nothing(
    http: httpx.AsyncClient,
) -> None:
    wake_stream = f"/plain/{unique_id('w')}"
    created = await http.put(wake_stream, headers={"Content-Type": "text/plain"})
    assert created.status_code == 201, created.text
    runner_id = unique_id("r")
    response = await register(http, {"id": runner_id, "label": "x", "wake_stream": wake_stream})
    assert_error(
        response, 409, "STREAM_EXISTS", "Stream already exists with a different content type"
    )
    missing = await http.get(f"/_electric/runners/{runner_id}", headers=ALICE)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": "a\x00b"}, "id must not contain NUL characters"),
        ({"label": "x\x00"}, "label must not contain NUL characters"),
        ({"wake_stream": "/w\x00"}, "wake_stream must not contain NUL characters"),
        ({"wake_stream": "//"}, "wake_stream must name a stream, got: //"),
        ({"wake_stream": "/" + "w" * 1025}, "wake_stream is limited to 1024 bytes"),
    ],
    ids=["nul-id", "nul-label", "nul-wake-stream", "slashes-only", "long-wake-stream"],
)
async def test_register_with_an_unstorable_value_is_400(
    http: httpx.AsyncClient, fields: dict[str, Any], message: str
) -> None:
    response = await register(http, {"id": unique_id("r"), "label": "x", **fields})
    assert_error(response, 400, "INVALID_REQUEST", message)


async def test_runner_ids_may_hold_a_slash_and_are_addressed_percent_encoded(
    http: httpx.AsyncClient,
) -> None:
    runner_id = f"{unique_id('r')}/child"
    runner = await registered(http, id=runner_id)
    assert runner["wake_stream"] == f"/runners/{runner_id}/wake"
    encoded = runner_id.replace("/", "%2F")
    fetched = await http.get(f"/_electric/runners/{encoded}", headers=ALICE)
    assert fetched.json() == runner


async def test_a_runner_id_with_a_nul_is_simply_not_found(http: httpx.AsyncClient) -> None:
    response = await http.get("/_electric/runners/a%00b", headers=ALICE)
    assert_error(response, 404, "NOT_FOUND", "Runner not found")


async def test_register_also_answers_with_a_trailing_slash(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/_electric/runners/", json={"id": unique_id("r"), "label": "x"}, headers=ALICE
    )
    assert response.status_code == 201, response.text


# --- list and get ---------------------------------------------------------------------------


async def test_list_shows_only_the_callers_runners_newest_first(http: httpx.AsyncClient) -> None:
    carol = {"electric-principal": "user:carol"}
    ids = []
    for _ in range(3):
        response = await register(http, {"id": unique_id("r"), "label": "c"}, headers=carol)
        ids.append(response.json()["id"])
    await registered(http)  # alice's, not listed for carol
    listed = await http.get("/_electric/runners", headers=carol)
    assert listed.status_code == 200
    assert [runner["id"] for runner in listed.json()] == ids[::-1]
    filtered = await http.get(
        "/_electric/runners",
        params={"owner_principal": "/principal/user:carol"},
        headers=carol,
    )
    assert [runner["id"] for runner in filtered.json()] == ids[::-1]


async def test_list_filtered_by_another_owner_is_403(http: httpx.AsyncClient) -> None:
    response = await http.get(
        "/_electric/runners", params={"owner_principal": BOB_URL}, headers=ALICE
    )
    assert_error(
        response, 403, "UNAUTHORIZED", "owner_principal must match the authenticated principal"
    )


async def test_list_filtered_by_a_malformed_owner_is_400(http: httpx.AsyncClient) -> None:
    response = await http.get(
        "/_electric/runners", params={"owner_principal": "bob"}, headers=ALICE
    )
    assert_error(
        response,
        400,
        "INVALID_REQUEST",
        "owner_principal must be a valid principal URL (e.g. /principal/user%3Aalice), got: bob",
    )


async def test_without_a_principal_header_runners_belong_to_the_dev_principal(
    http: httpx.AsyncClient,
) -> None:
    response = await register(http, {"id": unique_id("r"), "label": "x"}, headers={})
    assert response.status_code == 201, response.text
    assert response.json()["owner_principal"] == "/principal/system%3Adev-local"


async def test_get_returns_the_runner_to_its_owner(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    response = await http.get(f"/_electric/runners/{runner['id']}", headers=ALICE)
    assert response.status_code == 200
    assert response.json() == runner


RUNNER_SUBPATHS = [("GET", ""), ("GET", "/health"), ("POST", "/enable"), ("POST", "/disable")]
RUNNER_SUBPATHS += [("POST", "/heartbeat")]


@pytest.mark.parametrize(("method", "suffix"), RUNNER_SUBPATHS)
async def test_runner_routes_for_an_unknown_runner_are_404(
    http: httpx.AsyncClient, method: str, suffix: str
) -> None:
    response = await http.request(
        method, f"/_electric/runners/{unique_id('missing')}{suffix}", headers=ALICE
    )
    assert_error(response, 404, "NOT_FOUND", "Runner not found")


@pytest.mark.parametrize(("method", "suffix"), RUNNER_SUBPATHS)
async def test_runner_routes_for_someone_elses_runner_are_403(
    http: httpx.AsyncClient, method: str, suffix: str
) -> None:
    runner = await registered(http)
    response = await http.request(method, f"/_electric/runners/{runner['id']}{suffix}", headers=BOB)
    assert_error(response, 403, "UNAUTHORIZED", "Runner access requires the authenticated owner")
    unchanged = await http.get(f"/_electric/runners/{runner['id']}", headers=ALICE)
    assert unchanged.json() == runner


# --- enable / disable -----------------------------------------------------------------------


async def test_disable_then_enable_sets_admin_status(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    disabled = await http.post(f"/_electric/runners/{runner['id']}/disable", headers=ALICE)
    assert disabled.status_code == 200
    assert disabled.json()["admin_status"] == "disabled"
    assert list(disabled.json()) == RUNNER_KEYS
    enabled = await http.post(f"/_electric/runners/{runner['id']}/enable", headers=ALICE)
    assert enabled.json()["admin_status"] == "enabled"
    fetched = await http.get(f"/_electric/runners/{runner['id']}", headers=ALICE)
    assert fetched.json()["admin_status"] == "enabled"


# --- heartbeat ------------------------------------------------------------------------------


async def heartbeat(
    http: httpx.AsyncClient, runner_id: str, body: Any, headers: dict[str, str] = ALICE
) -> httpx.Response:
    return await http.post(f"/_electric/runners/{runner_id}/heartbeat", json=body, headers=headers)


async def test_heartbeat_defaults_the_lease_to_30_seconds(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    response = await heartbeat(http, runner["id"], {})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == [*RUNNER_KEYS, "last_seen_at", "liveness_lease_expires_at"]
    lease = parse_iso(body["liveness_lease_expires_at"]) - parse_iso(body["last_seen_at"])
    assert lease == timedelta(seconds=30)


async def test_heartbeat_with_lease_ms_offset_and_diagnostics(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    diagnostics = {
        "status": "streaming",
        "stream_connected": True,
        "last_heartbeat_ok": True,
        "last_claim_result": None,
        "started_at": "2026-01-01T00:00:00.000Z",
        "last_error": None,
        "reconnect_count": 2,
        "events_received": 10.5,
    }
    response = await heartbeat(
        http,
        runner["id"],
        {"lease_ms": 5000, "wake_stream_offset": "0000_0042", "diagnostics": diagnostics},
    )
    body = response.json()
    lease = parse_iso(body["liveness_lease_expires_at"]) - parse_iso(body["last_seen_at"])
    assert lease == timedelta(seconds=5)
    assert body["wake_stream_offset"] == "0000_0042"
    assert body["diagnostics"] == diagnostics


async def test_heartbeat_drops_unknown_and_invalid_diagnostics(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    response = await heartbeat(
        http,
        runner["id"],
        {
            "diagnostics": {
                "status": "dancing",
                "stream_connected": "yes",
                "last_claim_result": "maybe",
                "last_error_at": 5,
                "reconnect_count": -1,
                "claims_failed": True,
                "claims_succeeded": 3,
                "secret": "x",
            }
        },
    )
    assert response.json()["diagnostics"] == {"claims_succeeded": 3}
    nothing_left = await heartbeat(http, runner["id"], {"diagnostics": {"secret": "x"}})
    assert "diagnostics" not in nothing_left.json()


async def test_heartbeat_accepts_the_camel_case_offset_alias(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    response = await heartbeat(http, runner["id"], {"wakeStreamOffset": "7"})
    assert response.json()["wake_stream_offset"] == "7"


async def test_heartbeat_with_an_explicit_lease_expiry_uses_it(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    expiry = "2030-05-06T07:08:09.123Z"
    response = await heartbeat(http, runner["id"], {"liveness_lease_expires_at": expiry})
    assert response.json()["liveness_lease_expires_at"] == expiry


async def test_heartbeat_keeps_offset_and_diagnostics_when_not_resent(
    http: httpx.AsyncClient,
) -> None:
    runner = await registered(http)
    await heartbeat(
        http, runner["id"], {"wake_stream_offset": "9", "diagnostics": {"status": "streaming"}}
    )
    second = await heartbeat(http, runner["id"], {})
    assert "wake_stream_offset" not in second.json()
    health = (await http.get(f"/_electric/runners/{runner['id']}/health", headers=ALICE)).json()
    assert health["runner"]["wake_stream_offset"] == "9"
    assert health["client"] == {"status": "streaming"}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"lease_ms": "30"}, "/lease_ms"),
        ({"wake_stream_offset": 3}, "/wake_stream_offset"),
        ({"wakeStreamOffset": 3}, "/wakeStreamOffset"),
        ({"liveness_lease_expires_at": 1}, "/liveness_lease_expires_at"),
        ({"diagnostics": []}, "/diagnostics"),
        ("nope", "/"),
    ],
)
async def test_heartbeat_off_schema_is_400_even_for_an_unknown_runner(
    http: httpx.AsyncClient, body: Any, path: str
) -> None:
    response = await heartbeat(http, unique_id("missing"), body)
    assert_error(response, 400, "INVALID_REQUEST", "Request body does not match API schema")
    assert [detail["path"] for detail in response.json()["error"]["details"]] == [path]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"liveness_lease_expires_at": "tomorrow"},
            "liveness_lease_expires_at must be an ISO-8601 timestamp, got: tomorrow",
        ),
        (
            {"liveness_lease_expires_at": "0001-01-01T00:00:00+05:00"},
            "liveness_lease_expires_at must be an ISO-8601 timestamp, "
            "got: 0001-01-01T00:00:00+05:00",
        ),
        ({"lease_ms": 1e300}, "lease_ms is out of range: 1e+300"),
        ({"wake_stream_offset": "0\x00"}, "wake_stream_offset must not contain NUL characters"),
    ],
    ids=["bad-expiry", "expiry-before-year-1", "huge-lease", "nul-offset"],
)
async def test_heartbeat_with_an_unusable_value_is_400(
    http: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    runner = await registered(http)
    response = await heartbeat(http, runner["id"], body)
    assert_error(response, 400, "INVALID_REQUEST", message)


async def test_heartbeat_drops_diagnostic_strings_that_cannot_be_stored(
    http: httpx.AsyncClient,
) -> None:
    runner = await registered(http)
    response = await heartbeat(
        http, runner["id"], {"diagnostics": {"last_error": "a\x00b", "status": "stopped"}}
    )
    assert response.status_code == 200, response.text
    assert response.json()["diagnostics"] == {"status": "stopped"}


# --- health ---------------------------------------------------------------------------------


async def health_of(http: httpx.AsyncClient, runner_id: str) -> dict[str, Any]:
    response = await http.get(f"/_electric/runners/{runner_id}/health", headers=ALICE)
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def test_health_of_a_runner_that_never_heartbeated(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    report = await health_of(http, runner["id"])
    assert report == {
        "runner": {
            "id": runner["id"],
            "admin_status": "enabled",
            "liveness_status": "offline",
            "lease_expires_at": None,
            "lease_remaining_ms": 0,
            "wake_stream": runner["wake_stream"],
            "wake_stream_offset": None,
            "last_seen_at": None,
            "created_at": runner["created_at"],
        },
        "client": None,
        "claims": {"active_count": 0, "active": []},
        "dispatch": {
            "entities_with_active_claim": 0,
            "entities_with_outstanding_wake": 0,
            "entities_with_pending_work": 0,
        },
        "health": {"status": "degraded", "issues": ["Runner has never sent a heartbeat"]},
    }


async def test_health_of_a_live_runner_with_good_diagnostics_is_healthy(
    http: httpx.AsyncClient,
) -> None:
    runner = await registered(http)
    beat = await heartbeat(
        http,
        runner["id"],
        {"lease_ms": 60_000, "diagnostics": {"stream_connected": True, "reconnect_count": 5}},
    )
    report = await health_of(http, runner["id"])
    assert report["runner"]["liveness_status"] == "online"
    assert report["runner"]["lease_expires_at"] == beat.json()["liveness_lease_expires_at"]
    assert report["runner"]["last_seen_at"] == beat.json()["last_seen_at"]
    assert 50_000 < report["runner"]["lease_remaining_ms"] <= 60_000
    assert report["client"] == {"stream_connected": True, "reconnect_count": 5}
    assert report["health"] == {"status": "healthy", "issues": []}


async def test_health_without_client_diagnostics_is_degraded(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    await heartbeat(http, runner["id"], {})
    report = await health_of(http, runner["id"])
    assert report["health"] == {"status": "degraded", "issues": ["No client diagnostics available"]}


async def test_health_reports_every_client_problem(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    await heartbeat(
        http,
        runner["id"],
        {
            "diagnostics": {
                "stream_connected": False,
                "last_heartbeat_ok": False,
                "reconnect_count": 6,
            }
        },
    )
    report = await health_of(http, runner["id"])
    assert report["health"] == {
        "status": "degraded",
        "issues": [
            "Client reports stream disconnected",
            "Client reports last heartbeat failed",
            "Client has reconnected 6 times",
        ],
    }


async def test_health_of_an_expired_lease_is_unhealthy(http: httpx.AsyncClient) -> None:
    runner = await registered(http)
    expired = (datetime.now(UTC) - timedelta(seconds=120)).isoformat().replace("+00:00", "Z")
    await heartbeat(
        http,
        runner["id"],
        {"liveness_lease_expires_at": expired, "diagnostics": {"status": "reconnecting"}},
    )
    report = await health_of(http, runner["id"])
    assert report["runner"]["liveness_status"] == "expired"
    assert report["runner"]["lease_remaining_ms"] == 0
    assert report["health"]["status"] == "unhealthy"
    [issue] = report["health"]["issues"]
    assert issue.startswith("Heartbeat lease expired ") and issue.endswith("s ago")
    assert 119 <= int(issue.removeprefix("Heartbeat lease expired ").removesuffix("s ago")) <= 130


async def test_health_of_a_disabled_runner_is_offline_and_unhealthy(
    http: httpx.AsyncClient,
) -> None:
    runner = await registered(http)
    await heartbeat(http, runner["id"], {"diagnostics": {"status": "streaming"}})
    await http.post(f"/_electric/runners/{runner['id']}/disable", headers=ALICE)
    report = await health_of(http, runner["id"])
    assert report["runner"]["liveness_status"] == "offline"
    assert report["runner"]["admin_status"] == "disabled"
    assert report["health"] == {"status": "unhealthy", "issues": ["Runner is disabled"]}


async def test_health_counts_active_claims_and_dispatch_state(
    http: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    runner = await registered(http)
    other = await registered(http)
    claimed_at = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)
    for consumer, status, runner_id in [
        ("w_active", "active", runner["id"]),
        ("w_released", "released", runner["id"]),
        ("w_other", "active", other["id"]),
    ]:
        await db.execute(
            """
            INSERT INTO consumer_claims (tenant_id, consumer_id, epoch, entity_url, stream_path,
                                         runner_id, status, claimed_at)
            VALUES ($1, $2, 3, '/t/i', '/t/i/main', $3, $4, $5)
            """,
            TENANT,
            consumer,
            runner_id,
            status,
            claimed_at,
        )
    for url, consumer, wake, pending, runner_id in [
        ("/t/a", "w_active", None, "[]", runner["id"]),
        ("/t/b", None, "wake-1", '["/t/b/main"]', runner["id"]),
        ("/t/c", "w_x", "wake-2", '["/t/c/main"]', runner["id"]),
        ("/t/d", "w_y", "wake-3", '["/t/d/main"]', other["id"]),
    ]:
        await db.execute(
            """
            INSERT INTO entity_dispatch_state (tenant_id, entity_url, active_consumer_id,
                outstanding_wake_id, pending_source_streams, active_runner_id)
            VALUES ($1, $2, $3, $4, $5::jsonb, $6)
            """,
            TENANT,
            url,
            consumer,
            wake,
            pending,
            runner_id,
        )
    report = await health_of(http, runner["id"])
    assert report["claims"] == {
        "active_count": 1,
        "active": [
            {
                "consumer_id": "w_active",
                "epoch": 3,
                "entity_url": "/t/i",
                "stream_path": "/t/i/main",
                "claimed_at": "2026-03-04T05:06:07.890Z",
                "last_heartbeat_at": None,
                "lease_expires_at": None,
            }
        ],
    }
    assert report["dispatch"] == {
        "entities_with_active_claim": 2,
        "entities_with_outstanding_wake": 1,
        "entities_with_pending_work": 2,
    }

"""The tables the shape API serves, with the columns it pins (spec/02 §3.2): the reference's
proxy forces exactly these column lists, whatever `columns` the client asks for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeTable:
    name: str
    columns: tuple[str, ...]
    primary_key: tuple[str, ...]
    # Rows are filtered to the caller's own principal (`owner_principal = <principal url>`).
    owner_filtered: bool = False

    @property
    def column_set(self) -> frozenset[str]:
        return frozenset(self.columns)


SHAPE_TABLES: dict[str, ShapeTable] = {
    table.name: table
    for table in (
        # `write_token` and `subscription_id` are left out: they are capabilities.
        ShapeTable(
            "entities",
            (
                "tenant_id", "url", "type", "status", "dispatch_policy", "tags", "spawn_args",
                "parent", "type_revision", "inbox_schemas", "state_schemas", "created_at",
                "updated_at",
            ),
            ("tenant_id", "url"),
        ),
        ShapeTable(
            "entity_types",
            (
                "tenant_id", "name", "description", "creation_schema", "inbox_schemas",
                "state_schemas", "serve_endpoint", "default_dispatch_policy", "revision",
                "created_at", "updated_at",
            ),
            ("tenant_id", "name"),
        ),
        ShapeTable(
            "runners",
            (
                "tenant_id", "id", "owner_principal", "label", "kind", "admin_status",
                "wake_stream", "created_at", "updated_at",
            ),
            ("tenant_id", "id"),
            owner_filtered=True,
        ),
        ShapeTable(
            "runner_runtime_diagnostics",
            (
                "tenant_id", "runner_id", "owner_principal", "wake_stream_offset",
                "last_seen_at", "liveness_lease_expires_at", "diagnostics", "updated_at",
            ),
            ("tenant_id", "runner_id"),
            owner_filtered=True,
        ),
    )
}  # fmt: skip

"""The `manifest` events schedules write on their owner's main stream (spec/02 §8,
spec/03 §3.5.6, §5.7, §5.8). `value` comes after `headers`, as in the reference."""

from __future__ import annotations

from typing import Any

from electric_agents.agents.events import iso_timestamp


def manifest_upsert(key: str, value: dict[str, Any], txid: str, epoch_ms: int) -> dict[str, Any]:
    return {
        "type": "manifest",
        "key": key,
        "headers": {"operation": "upsert", "timestamp": iso_timestamp(epoch_ms), "txid": txid},
        "value": value,
    }


def manifest_delete(key: str, txid: str, epoch_ms: int) -> dict[str, Any]:
    return {
        "type": "manifest",
        "key": key,
        "headers": {"operation": "delete", "timestamp": iso_timestamp(epoch_ms), "txid": txid},
    }


def manifest_status_update(
    key: str, entry: dict[str, Any], status: str, error: str | None, epoch_ms: int
) -> dict[str, Any]:
    """A future send's entry once it fired: `sent` + `sentAt`, or `failed` + `failedAt` +
    `lastError`."""
    value = {k: v for k, v in entry.items() if k not in ("failedAt", "lastError", "sentAt")}
    value["status"] = status
    if status == "sent":
        value["sentAt"] = iso_timestamp(epoch_ms)
    else:
        value["failedAt"] = iso_timestamp(epoch_ms)
        value["lastError"] = error or "unknown error"
    return {
        "type": "manifest",
        "key": key,
        "headers": {"operation": "update", "timestamp": iso_timestamp(epoch_ms)},
        "value": value,
    }

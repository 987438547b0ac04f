"""An entity's row and its two streams, written inside one transaction.

Spawn (and a principal's materialisation) inserts the row and creates `<url>/main` (with its
first events) and `<url>/error` together, so a failure leaves neither (the reference created
the row first and the streams after, with a crash window between, spec/03 §6.5). Server
events appended to a main stream go through `append_to_main`, which turns a closed stream
into the error the API promises.
"""

from __future__ import annotations

from typing import Any

from electric_agents.agents import events
from electric_agents.agents.entity_store import Entity, insert_entity
from electric_agents.errors import ApiError
from electric_agents.streams.engine import StreamTransaction
from electric_agents.streams.lifecycle import CreateSpec
from electric_agents.streams.writer import AppendResult


def duplicate_url(url: str) -> ApiError:
    return ApiError(409, "DUPLICATE_URL", f'Entity already exists at URL "{url}"')


async def create_entity_with_streams(
    tx: StreamTransaction, tenant: str, entity: Entity, first_events: list[dict[str, Any]]
) -> None:
    """Insert the row and create both streams, the main one holding `first_events`.

    A taken URL, or a stream already at one of the paths (created through the raw stream
    API), is a 409 DUPLICATE_URL; the caller's transaction then rolls everything back."""
    if not await insert_entity(tx.conn, tenant, entity):
        raise duplicate_url(entity.url)
    for url, body in (
        (entity.main_stream, events.encode(*first_events)),
        (entity.error_stream, b""),
    ):
        try:
            result = await tx.create(
                CreateSpec(events.stream_path(url), events.JSON_CONTENT_TYPE, body=body)
            )
        except ApiError as error:
            if error.status == 409:
                raise duplicate_url(entity.url) from None
            raise
        if not result.created:
            raise duplicate_url(entity.url)


async def append_to_main(tx: StreamTransaction, entity: Entity, *items: dict[str, Any]) -> None:
    """Append each event as its own message to the entity's main stream, in this order."""
    for item in items:
        await _append(tx, entity, events.encode(item))


async def _append(tx: StreamTransaction, entity: Entity, body: bytes) -> AppendResult:
    try:
        return await tx.append(
            events.stream_path(entity.main_stream),
            content_type=events.JSON_CONTENT_TYPE,
            body=body,
        )
    except ApiError as error:
        if error.code == "STREAM_CLOSED":
            raise ApiError(409, "NOT_RUNNING", "Entity is stopped") from None
        raise

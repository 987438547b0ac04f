"""The Electric shape HTTP protocol over our own tables (spec/02 §3.2, spec/04 §4).

A request names a table, an offset and (past the snapshot) the handle it got. We answer:

* `offset=-1`: a snapshot of the matching rows as `insert` messages, then `up-to-date`.
* `offset=<position>_<n>` with a valid handle: the matching changes after that position
  from the change log, as insert/update/delete messages carrying the writer's `txids`;
  with `live=true` the request waits for the next change (long-poll).
* a handle that does not fit the request, or an offset behind the log's retention or past
  its head (another database): 409 with a fresh handle and `must-refetch`.

Handles are `<shape hash>-<snapshot position>`: the hash covers the shape definition and
the log's identity, the position makes each refetch hand out a new handle (the client
treats a handle it was told to drop as a stale cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from electric_agents.errors import ApiError
from electric_agents.shapes.log import ShapeLog
from electric_agents.shapes.tables import SHAPE_TABLES, ShapeTable
from electric_agents.shapes.where import Node, parse_where, quote_literal

CHANGES_PER_RESPONSE = 1000
SHARED_READS = 256
_OFFSET = re.compile(r"(\d{1,18})_(\d{1,18}|inf)")
_HANDLE = re.compile(r"([0-9a-f]{16})-(\d{1,18})")
_PARAM_KEY = re.compile(r"params\[(\d{1,4})\]")
# Electric's live cursor: 20 s intervals since 2024-10-09, so CDNs can collapse requests.
_CURSOR_EPOCH_S = 1728432000
_CURSOR_INTERVAL_S = 20
_UNSUPPORTED = ("subset__", "live_sse", "experimental_live_sse")


def _bad(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


@dataclass(frozen=True)
class ShapeRequest:
    table: ShapeTable
    offset: str  # "-1", "now" or "<position>_<n>"
    handle: str | None
    live: bool
    cursor: str | None
    where: str | None
    params: dict[str, str]
    replica_full: bool
    changes_only: bool

    @staticmethod
    def from_query(query: Mapping[str, list[str]]) -> ShapeRequest:
        def one(name: str) -> str | None:
            values = query.get(name)
            if values is not None and len(values) > 1:
                raise _bad(f"{name} given more than once")
            return values[0] if values else None

        for name in query:
            if name.startswith(_UNSUPPORTED):
                raise _bad(f"{name} is not supported by this server")
        table_name = one("table")
        if not table_name:
            raise _bad("table is required")
        table = SHAPE_TABLES.get(table_name)
        if table is None:
            raise _bad(f"table {table_name!r} is not served (one of {', '.join(SHAPE_TABLES)})")
        offset = one("offset")
        if offset is None:
            raise _bad("offset is required")
        if offset not in ("-1", "now") and not _OFFSET.fullmatch(offset):
            raise _bad(f"offset {offset!r} has an invalid format")
        handle = one("handle") or None
        live_raw = one("live") or "false"
        if live_raw not in ("true", "false"):
            raise _bad("live must be true or false")
        live = live_raw == "true"
        if offset == "-1" and live:
            raise _bad("live requests need an offset past the snapshot (not -1)")
        if offset not in ("-1", "now") and handle is None:
            raise _bad("handle is required when offset is not -1")
        replica = one("replica") or "default"
        if replica not in ("default", "full"):
            raise _bad("replica must be default or full")
        log_mode = one("log") or "full"
        if log_mode not in ("full", "changes_only"):
            raise _bad("log must be full or changes_only")
        params: dict[str, str] = {}
        for name, values in query.items():
            found = _PARAM_KEY.fullmatch(name)
            if found:
                params[str(int(found.group(1)))] = values[0]
        return ShapeRequest(
            table=table,
            offset=offset,
            handle=handle,
            live=live,
            cursor=one("cursor"),
            where=one("where") or None,
            params=params,
            replica_full=replica == "full",
            changes_only=log_mode == "changes_only",
        )


@dataclass
class ShapeResponse:
    status: int
    messages: list[dict[str, Any]]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return orjson.dumps(self.messages)


@dataclass(frozen=True)
class _Filter:
    """The row predicate of one shape: tenant, owner, and the client's where."""

    tenant_id: str
    owner: str | None
    where: Node | None

    def sql(self, alias: str) -> str:
        def qualify(column: str) -> str:
            return f'{alias}."{column}"'

        parts = [f"{qualify('tenant_id')} = {quote_literal(self.tenant_id)}"]
        if self.owner is not None:
            parts.append(f"{qualify('owner_principal')} = {quote_literal(self.owner)}")
        if self.where is not None:
            parts.append(f"({self.where(qualify)})")
        return " AND ".join(parts)


class ShapeService:
    def __init__(self, pool: asyncpg.Pool, shape_log: ShapeLog, live_timeout_s: float) -> None:
        self.pool = pool
        self.log = shape_log
        self.live_timeout_s = live_timeout_s
        self._schemas: dict[str, str] = {}
        self._log_id_cache: str | None = None
        # Recent change reads by (shape, after, head), shared by concurrent readers.
        self._reads: dict[tuple[str, int, int], asyncio.Future[Any]] = {}

    async def serve(
        self, request: ShapeRequest, tenant_id: str, principal_url: str
    ) -> ShapeResponse:
        table = request.table
        owner = principal_url if table.owner_filtered else None
        where = (
            parse_where(request.where, table.column_set, request.params) if request.where else None
        )
        row_filter = _Filter(tenant_id, owner, where)
        schema = await self._schema(table)
        shape_hash = _shape_hash(await self._log_id(), tenant_id, owner, request)
        if request.offset == "-1":
            return await self._snapshot(request, row_filter, schema, shape_hash)
        head = await self.log.current_head()
        if request.handle is not None and not _handle_fits(request.handle, shape_hash):
            return _must_refetch(f"{shape_hash}-{head}")
        handle = request.handle or f"{shape_hash}-{head}"
        if request.offset == "now":
            return _answer(request, handle, head, [], schema, True)
        position = int(request.offset.split("_", 1)[0])
        deadline = time.monotonic() + self.live_timeout_s
        while True:
            # An offset past this process's head came from a fresher process: nothing new yet.
            if position < head:
                read = await self._changes_between(shape_hash, request, row_filter, position, head)
                if read is None:
                    return _must_refetch(f"{shape_hash}-{head}")
                changes, last = read
                if changes or last is not None or not request.live:
                    next_position = head if last is None else last
                    return _answer(request, handle, next_position, changes, schema, last is None)
                # Nothing of this shape up to `head`: skip those changes from now on.
                position = head
            elif not request.live:
                return _answer(request, handle, position, [], schema, True)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.log.wait_beyond(position, remaining):
                return _answer(request, handle, position, [], schema, True)
            head = self.log.head

    async def _snapshot(
        self, request: ShapeRequest, row_filter: _Filter, schema: str, shape_hash: str
    ) -> ShapeResponse:
        # One REPEATABLE READ transaction: every change up to `head` is in the rows.
        async with (
            self.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            head: int = await conn.fetchval("SELECT position FROM shape_log_head")
            rows = (
                []
                if request.changes_only
                else await _snapshot_rows(conn, request.table, row_filter)
            )
        messages = [_insert(request.table, row) for row in rows]
        return _answer(request, f"{shape_hash}-{head}", head, messages, schema, True)

    async def _changes_between(
        self,
        shape_hash: str,
        request: ShapeRequest,
        row_filter: _Filter,
        after: int,
        head: int,
    ) -> tuple[list[dict[str, Any]], int | None] | None:
        """The shape's changes in (after, head], read once for all requests asking for the
        same range at the same time (a change wakes every live reader of a shape at once);
        None when retention already dropped part of the range."""
        key = (shape_hash, after, head)
        shared = self._reads.get(key)
        if shared is None:
            shared = asyncio.ensure_future(self._read_changes(request, row_filter, after, head))
            self._reads[key] = shared
            shared.add_done_callback(lambda done: self._forget_failed(key, done))
            while len(self._reads) > SHARED_READS:
                self._reads.pop(next(iter(self._reads)))
        return await asyncio.shield(shared)

    def _forget_failed(self, key: tuple[str, int, int], done: asyncio.Future[Any]) -> None:
        if (done.cancelled() or done.exception() is not None) and self._reads.get(key) is done:
            del self._reads[key]

    async def _read_changes(
        self, request: ShapeRequest, row_filter: _Filter, after: int, head: int
    ) -> tuple[list[dict[str, Any]], int | None] | None:
        async with self.pool.acquire() as conn:
            # Positions up to `head` were committed by the sequencer that set it, so a plain
            # statement sees all of them; a prune may have removed some, hence the check.
            read = await _changes(conn, request, row_filter, after, head, CHANGES_PER_RESPONSE)
            purged: int = await conn.fetchval("SELECT purged_through FROM shape_log_head")
        return None if after < purged else read

    async def _log_id(self) -> str:
        if self._log_id_cache is None:
            async with self.pool.acquire() as conn:
                self._log_id_cache = await conn.fetchval("SELECT log_id FROM shape_log_head")
        assert self._log_id_cache is not None
        return self._log_id_cache

    async def _schema(self, table: ShapeTable) -> str:
        cached = self._schemas.get(table.name)
        if cached is not None:
            return cached
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """
                SELECT a.attname, t.typname, a.attnotnull, a.attndims
                FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
                """,
                table.name,
            )
        by_name = {row["attname"]: row for row in rows}
        schema: dict[str, dict[str, Any]] = {}
        for column in table.columns:
            row = by_name[column]
            info: dict[str, Any] = {"type": row["typname"]}
            if row["typname"].startswith("_"):
                info = {"type": row["typname"][1:], "dims": max(row["attndims"], 1)}
            if row["attnotnull"]:
                info["not_null"] = True
            if column in table.primary_key:
                info["pk_index"] = table.primary_key.index(column)
            schema[column] = info
        encoded = orjson.dumps(schema).decode()
        self._schemas[table.name] = encoded
        return encoded


def _shape_hash(log_id: str, tenant_id: str, owner: str | None, request: ShapeRequest) -> str:
    definition = orjson.dumps(
        [
            log_id,
            tenant_id,
            owner,
            request.table.name,
            request.where,
            sorted(request.params.items()),
            request.replica_full,
        ]
    )
    return hashlib.sha256(definition).hexdigest()[:16]


def _handle_fits(handle: str, shape_hash: str) -> bool:
    found = _HANDLE.fullmatch(handle)
    return bool(found) and found.group(1) == shape_hash


def _cursor(previous: str | None) -> str:
    cursor = int((time.time() - _CURSOR_EPOCH_S) // _CURSOR_INTERVAL_S)
    if previous is not None and str(cursor) == previous:
        # The same cursor twice would let a cache answer the next request with this one.
        cursor += random.randint(1, 3600)
    return str(cursor)


def _answer(
    request: ShapeRequest,
    handle: str,
    position: int,
    messages: list[dict[str, Any]],
    schema: str,
    up_to_date: bool,
) -> ShapeResponse:
    headers = {
        "electric-handle": handle,
        "electric-offset": f"{position}_0",
        "Cache-Control": "no-store",
    }
    if request.live:
        headers["electric-cursor"] = _cursor(request.cursor)
    else:
        headers["electric-schema"] = schema
    if up_to_date:
        headers["electric-up-to-date"] = ""
        messages = [
            *messages,
            {"headers": {"control": "up-to-date", "global_last_seen_lsn": str(position)}},
        ]
    return ShapeResponse(200, messages, headers)


def _must_refetch(handle: str) -> ShapeResponse:
    return ShapeResponse(
        409,
        [{"headers": {"control": "must-refetch"}}],
        {"electric-handle": handle, "Cache-Control": "no-store"},
    )


def _key(table: ShapeTable, row: Mapping[str, Any]) -> str:
    # Electric's key format: "schema"."table"/"pk1"/"pk2", `/` doubled inside values.
    parts = ['"' + str(row[c]).replace("/", "//") + '"' for c in table.primary_key]
    return f'"public"."{table.name}"/' + "/".join(parts)


def _insert(table: ShapeTable, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": _key(table, row),
        "value": row,
        "headers": {"operation": "insert", "relation": ["public", table.name]},
    }


def _text_columns(table: ShapeTable, alias: str, prefix: str = "") -> str:
    # Values travel as Postgres text; the client parses them by the announced column types.
    return ", ".join(f'{alias}."{c}"::text AS "{prefix}{c}"' for c in table.columns)


async def _snapshot_rows(
    conn: asyncpg.Connection, table: ShapeTable, row_filter: _Filter
) -> list[dict[str, Any]]:
    order = ", ".join(f'r."{c}"' for c in table.primary_key)
    with _where_errors():
        rows = await conn.fetch(
            f"SELECT {_text_columns(table, 'r')} FROM {table.name} r "
            f"WHERE {row_filter.sql('r')} ORDER BY {order}"
        )
    return [dict(row) for row in rows]


@contextlib.contextmanager
def _where_errors() -> Iterator[None]:
    """A where clause that parses but does not type-check (`created_at > 'abc'`, `url @> 1`)
    fails in Postgres: that is the client's input, so 400, not 500."""
    try:
        yield
    except (asyncpg.DataError, asyncpg.exceptions.SyntaxOrAccessError) as error:
        raise ApiError(400, "INVALID_REQUEST", f"Invalid where clause: {error}") from None


async def _changes(
    conn: asyncpg.Connection,
    request: ShapeRequest,
    row_filter: _Filter,
    after: int,
    head: int,
    limit: int,
) -> tuple[list[dict[str, Any]], int | None]:
    """Change messages for log positions in (after, head]; the second value is the last
    position read when the limit cut the read short, else None (caught up to `head`)."""
    table = request.table
    with _where_errors():
        rows = await conn.fetch(
            f"""
        SELECT c.position, c.txid, c.operation,
               c.new_row IS NOT NULL AND coalesce({row_filter.sql("n")}, false) AS new_in,
               c.old_row IS NOT NULL AND coalesce({row_filter.sql("o")}, false) AS old_in,
               {_text_columns(table, "n", "n_")}, {_text_columns(table, "o", "o_")}
        FROM shape_changes c
        CROSS JOIN LATERAL jsonb_populate_record(NULL::{table.name}, coalesce(c.new_row, '{{}}')) n
        CROSS JOIN LATERAL jsonb_populate_record(NULL::{table.name}, coalesce(c.old_row, '{{}}')) o
        WHERE c.tenant_id = $1 AND c.table_name = $2 AND c.position > $3 AND c.position <= $4
        ORDER BY c.position
        LIMIT $5
        """,
            row_filter.tenant_id,
            table.name,
            after,
            head,
            limit,
        )
    messages: list[dict[str, Any]] = []
    for row in rows:
        message = _change_message(table, row, request.replica_full)
        if message is not None:
            messages.append(message)
    last = rows[-1]["position"] if len(rows) == limit else None
    return messages, last


def _change_message(
    table: ShapeTable, row: asyncpg.Record, replica_full: bool
) -> dict[str, Any] | None:
    new = {c: row[f"n_{c}"] for c in table.columns}
    old = {c: row[f"o_{c}"] for c in table.columns}
    new_in, old_in = row["new_in"], row["old_in"]
    # A change that moves a row into or out of the shape is an insert or a delete for it.
    if new_in and old_in:
        if new == old:
            return None  # only hidden columns changed
        operation, value = "update", new
    elif new_in:
        operation, value = "insert", new
    elif old_in:
        operation = "delete"
        value = old if replica_full else {c: old[c] for c in table.primary_key}
    else:
        return None
    message: dict[str, Any] = {
        "key": _key(table, value),
        "value": value,
        "headers": {
            "operation": operation,
            "relation": ["public", table.name],
            "txids": [row["txid"]],
            "lsn": str(row["position"]),
            "op_position": 0,
        },
    }
    if operation == "update" and replica_full:
        message["old_value"] = {c: old[c] for c in table.columns if old[c] != new[c]}
    return message

"""The Durable Streams protocol over HTTP (spec/01 Part A), as a plain ASGI app.

Mountable at any prefix: a request for `<prefix>/<path>` addresses the stream `<path>`. The
first segment `__ds` is the subscription control API (§A.19), handed to its own app.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import parse_qs, urlparse

import orjson

from electric_agents.errors import ApiError
from electric_agents.http.direct import (
    RawBodyWriter,
    WholeResponseWriter,
    raw_body_writer,
    whole_response_writer,
)
from electric_agents.http.responses import (
    COMMON_HEADERS,
    Receive,
    Scope,
    Send,
    encode_headers,
    header_map,
    read_body,
    send_error,
    send_response,
)
from electric_agents.streams.engine import InTransaction, StreamEngine
from electric_agents.streams.lifecycle import CreateSpec, parse_expires_at, validate_content_type
from electric_agents.streams.model import Message, StreamMeta, is_text_like
from electric_agents.streams.offsets import (
    format_offset,
    next_cursor,
    parse_offset,
    parse_read_offset,
)
from electric_agents.streams.producers import parse_producer_headers
from electric_agents.streams.reads import Chunk, LiveSession, response_body, start_position
from electric_agents.streams.writer import AppendRequest, AppendResult

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AppendPolicy(Protocol):
    """Rules a mounting application adds to plain appends (the agents server checks entity
    stream writes: write tokens, state schemas, lifecycle; spec/02 §3.6)."""

    async def check(self, path: str, headers: dict[str, str], body: bytes) -> InTransaction | None:
        """Raise an ApiError to refuse the append before it is stored. Return work that
        must commit in the append's own transaction (wake evaluation), or None to append
        through group commit."""

    async def appended(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """Called after a successful append (wake evaluation, run-finished handling)."""


_TTL_RE = re.compile(r"0|[1-9][0-9]{0,9}")
_SUB_OFFSET_RE = re.compile(r"0|[1-9][0-9]{0,9}")
# Larger values are refused with a 400 rather than overflowing the database's types.
MAX_TTL_SECONDS = (1 << 31) - 1
MAX_SUB_OFFSET = (1 << 31) - 1
# Longer paths cannot be indexed (Postgres limits index rows to about 2.7 kB).
MAX_PATH_BYTES = 1024
# SSE data events kept for other readers of the same range: how many, and how large.
MAX_MEMO_EVENTS = 256
MAX_MEMO_EVENT_BYTES = 256 * 1024
_STREAM_METHODS = "GET, HEAD, PUT, POST, DELETE, OPTIONS"
_CATCH_UP_CACHE_CONTROL = "public, max-age=60, stale-while-revalidate=300"


class StreamsApp:
    def __init__(
        self,
        engine: StreamEngine,
        *,
        prefix: str,
        long_poll_timeout_s: float,
        max_append_bytes: int,
        control_app: ASGIApp | None = None,
        append_policy: AppendPolicy | None = None,
    ) -> None:
        self.engine = engine
        self.prefix = prefix.rstrip("/")
        self.long_poll_timeout_s = long_poll_timeout_s
        self.max_append_bytes = max_append_bytes
        self.control_app = control_app
        self.append_policy = append_policy
        # SSE data events by (stream id, start, end): the same bytes for every reader.
        self._recent_events: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()

    def stream_path(self, raw_path: str) -> str | None:
        """The stream path under the mount (no leading slash), or None if outside it."""
        if self.prefix:
            if raw_path != self.prefix and not raw_path.startswith(self.prefix + "/"):
                return None
            raw_path = raw_path[len(self.prefix) :]
        return raw_path.lstrip("/")

    def appendable_path(self, raw_path: str) -> str | None:
        """The stream a request path addresses, when an append to it goes to the append
        route (not outside the mount, not `__ds`, not too long for a stream path)."""
        path = self.stream_path(raw_path)
        if not path or len(path) > MAX_PATH_BYTES or path == "__ds" or path.startswith("__ds/"):
            return None
        return path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = self.stream_path(raw_path.decode("latin-1").split("?", 1)[0])
        method = scope["method"]
        try:
            if path is None or path == "":
                raise ApiError(404, "NOT_FOUND", "Not found")
            if len(path) > MAX_PATH_BYTES:
                raise ApiError(
                    414, "PATH_TOO_LONG", f"Stream paths are limited to {MAX_PATH_BYTES} bytes"
                )
            if method == "OPTIONS":
                await send_response(send, 204)
                return
            if path == "__ds" or path.startswith("__ds/"):
                if self.control_app is None:
                    raise ApiError(404, "NOT_FOUND", "Subscriptions are not enabled")
                await self.control_app(scope, receive, send)
                return
            headers = header_map(scope["headers"])
            if method == "GET":
                await self._get(scope, receive, send, path, headers)
            elif method == "HEAD":
                await self._head(send, path)
            elif method == "PUT":
                await self._put(scope, receive, send, path, headers)
            elif method == "POST":
                await self._post(receive, send, path, headers)
            elif method == "DELETE":
                await self.engine.delete(path)
                await send_response(send, 204)
            else:
                raise ApiError(
                    405,
                    "METHOD_NOT_ALLOWED",
                    f"Method {method} is not allowed on streams",
                    headers={"Allow": _STREAM_METHODS},
                )
        except ApiError as error:
            if method == "HEAD":
                await send_response(send, error.status, error.headers)
            else:
                await send_error(send, error)

    # PUT --------------------------------------------------------------------------------

    async def _put(
        self, scope: Scope, receive: Receive, send: Send, path: str, headers: dict[str, str]
    ) -> None:
        spec = self._create_spec(path, headers, await read_body(receive, self.max_append_bytes))
        result = await self.engine.create(spec)
        meta = result.meta
        out = {
            "Content-Type": meta.content_type,
            "Stream-Next-Offset": format_offset(meta.tail),
        }
        if meta.closed:
            out["Stream-Closed"] = "true"
        if result.created:
            host = headers.get("host", "localhost")
            scheme = scope.get("scheme", "http")
            out["Location"] = f"{scheme}://{host}{self.prefix}/{path}"
        await send_response(send, 201 if result.created else 200, out)

    def _create_spec(self, path: str, headers: dict[str, str], body: bytes) -> CreateSpec:
        """Validate PUT headers in the order of spec/01 §A.4."""
        ttl_raw = headers.get("stream-ttl")
        expires_raw = headers.get("stream-expires-at")
        if ttl_raw is not None and expires_raw is not None:
            raise ApiError(
                400, "INVALID_EXPIRY", "Stream-TTL and Stream-Expires-At are mutually exclusive"
            )
        if ttl_raw is not None and (
            not _TTL_RE.fullmatch(ttl_raw) or int(ttl_raw) > MAX_TTL_SECONDS
        ):
            raise ApiError(
                400, "INVALID_TTL", f"Stream-TTL must be an integer from 0 to {MAX_TTL_SECONDS}"
            )
        expires_ts = parse_expires_at(expires_raw) if expires_raw is not None else None
        fork_offset_raw = headers.get("stream-fork-offset")
        fork_offset = None
        if fork_offset_raw is not None:
            fork_offset = parse_offset(fork_offset_raw)
            if fork_offset is None:
                raise ApiError(400, "INVALID_FORK_OFFSET", "Stream-Fork-Offset is malformed")
        forked_from_raw = headers.get("stream-forked-from")
        sub_raw = headers.get("stream-fork-sub-offset")
        sub_offset = None
        if sub_raw is not None:
            if forked_from_raw is None:
                raise ApiError(
                    400, "INVALID_FORK", "Stream-Fork-Sub-Offset needs Stream-Forked-From"
                )
            if not _SUB_OFFSET_RE.fullmatch(sub_raw) or int(sub_raw) > MAX_SUB_OFFSET:
                raise ApiError(
                    400, "INVALID_FORK_SUB_OFFSET", "Stream-Fork-Sub-Offset is malformed"
                )
            sub_offset = int(sub_raw)
        forked_from = None
        if forked_from_raw is not None:
            forked_from = self._source_path(forked_from_raw)
        return CreateSpec(
            path=path,
            content_type=validate_content_type(headers.get("content-type")),
            ttl_seconds=int(ttl_raw) if ttl_raw is not None else None,
            expires_at=expires_raw,
            expires_at_ts=expires_ts,
            closed=headers.get("stream-closed", "").lower() == "true",
            body=body,
            forked_from_path=forked_from,
            fork_offset=fork_offset,
            fork_sub_offset=sub_offset,
        )

    def _source_path(self, raw: str) -> str:
        if raw.startswith(("http://", "https://")):
            raw = urlparse(raw).path
        path = self.stream_path(raw if raw.startswith("/") else "/" + raw)
        if not path:
            raise ApiError(404, "FORK_SOURCE_NOT_FOUND", "Fork source stream not found")
        return path

    # POST -------------------------------------------------------------------------------

    async def _post(self, receive: Receive, send: Send, path: str, headers: dict[str, str]) -> None:
        # Producer header errors come before the body is read (spec/01 §A.5 steps 1-4).
        parse_producer_headers(
            headers.get("producer-id"), headers.get("producer-epoch"), headers.get("producer-seq")
        )
        body = await read_body(receive, self.max_append_bytes)
        result = await self.append(path, headers, body)
        await send_response(send, result.status, result.headers)
        await self.after_append(path, headers, body)

    def prepare_append(
        self, path: str, headers: dict[str, str], body: bytes | None
    ) -> AppendRequest:
        """Steps 1-4 of spec/01 §A.5, before the stream is looked up; `body` None means it
        was larger than the append limit."""
        producer = parse_producer_headers(
            headers.get("producer-id"), headers.get("producer-epoch"), headers.get("producer-seq")
        )
        if body is None:
            raise ApiError(
                413, "PAYLOAD_TOO_LARGE", f"Request body exceeds {self.max_append_bytes} bytes"
            )
        close = headers.get("stream-closed", "").lower() == "true"
        content_type = headers.get("content-type")
        if not body and not close:
            raise ApiError(400, "EMPTY_BODY", "An append needs a body")
        if body and not content_type:
            raise ApiError(400, "MISSING_CONTENT_TYPE", "An append needs a Content-Type")
        return self.engine.append_request(
            path,
            content_type=content_type,
            body=body,
            close=close,
            producer=producer,
            stream_seq=headers.get("stream-seq"),
        )

    def submit_plain_append(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> asyncio.Future[AppendResult] | None:
        """The whole append through group commit when no append policy applies (the direct
        HTTP path, http/direct.py); None when the policy must run (then use `append`)."""
        if self.append_policy is not None:
            return None
        return self.engine.writer.enqueue(self.prepare_append(path, headers, body))

    async def append(self, path: str, headers: dict[str, str], body: bytes) -> AppendResult:
        request = self.prepare_append(path, headers, body)
        in_transaction = None
        if self.append_policy is not None:
            in_transaction = await self.append_policy.check(path, headers, body)
        if in_transaction is None:
            return await self.engine.writer.enqueue(request)
        return await self.engine.append_then(request, then=in_transaction)

    async def after_append(self, path: str, headers: dict[str, str], body: bytes) -> None:
        """What the policy does once the response is out (run-finished handling)."""
        if self.append_policy is not None:
            await self.append_policy.appended(path, headers, body)

    # HEAD -------------------------------------------------------------------------------

    async def _head(self, send: Send, path: str) -> None:
        meta = await self.engine.head(path)
        out = {
            "Content-Type": meta.content_type,
            "Stream-Next-Offset": format_offset(meta.tail),
            "Cache-Control": "no-store",
        }
        if meta.ttl_seconds is not None:
            out["Stream-TTL"] = str(meta.ttl_seconds)
        if meta.expires_at is not None:
            out["Stream-Expires-At"] = meta.expires_at
        if meta.closed:
            out["Stream-Closed"] = "true"
        # No body, but the length a GET would have is unknown: send none.
        raw = encode_headers(out)
        raw.extend(COMMON_HEADERS)
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": b""})

    # GET --------------------------------------------------------------------------------

    async def _get(
        self, scope: Scope, receive: Receive, send: Send, path: str, headers: dict[str, str]
    ) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        offset = parse_read_offset(query.get("offset"))
        live = (query.get("live") or [None])[0]
        cursor = (query.get("cursor") or [None])[0]
        if live in ("long-poll", "sse") and offset is None:
            raise ApiError(400, "OFFSET_REQUIRED", "Live reads need an offset")
        if live == "long-poll":
            await self._long_poll(scope, send, path, offset, cursor)
        elif live == "sse":
            await self._sse(scope, receive, send, path, offset, cursor)
        else:
            await self._catch_up(send, path, offset, headers)

    async def _catch_up(
        self, send: Send, path: str, offset: int | str | None, headers: dict[str, str]
    ) -> None:
        if offset == "now":
            meta, chunk = await self.engine.catch_up(path, None)
            out = self._chunk_headers(meta, chunk)
            out["Cache-Control"] = "no-store"
            await send_response(send, 200, out, b"[]" if meta.is_json else b"")
            return
        after = 0 if offset is None or offset == -1 else int(offset)
        meta, chunk = await self.engine.catch_up(path, after)
        out = self._chunk_headers(meta, chunk)
        etag = _etag(path, offset, after, chunk)
        out["ETag"] = etag
        if not chunk.up_to_date:
            out["Cache-Control"] = _CATCH_UP_CACHE_CONTROL
        if headers.get("if-none-match") == etag:
            await send_response(send, 304, {"ETag": etag})
            return
        await send_response(send, 200, out, response_body(meta, chunk))

    async def _long_poll(
        self,
        scope: Scope,
        send: Send,
        path: str,
        offset: int | str | None,
        cursor: str | None,
    ) -> None:
        writer = whole_response_writer(scope)
        async with self.engine.live(path) as session:
            meta = session.meta
            assert meta is not None
            after = start_position(offset, meta)
            wait_s = self.long_poll_timeout_s
            if writer is not None:
                # At the tail, the commit that brings the next messages answers directly.
                follower = _LongPollFollower(self, path, meta, offset, after, cursor, writer)
                started = time.monotonic()
                if await follower.wait(session, wait_s):
                    return
                wait_s = max(0.0, wait_s - (time.monotonic() - started))
            chunk = await session.next_chunk(after, wait_s)
        if chunk is None:
            timed_out = {
                "Stream-Next-Offset": format_offset(after),
                "Stream-Up-To-Date": "true",
                "Stream-Cursor": next_cursor(cursor),
            }
            await _send_whole(send, writer, 204, timed_out, b"")
            return
        status, out, body = self._long_poll_response(meta, path, offset, after, cursor, chunk)
        await _send_whole(send, writer, status, out, body)

    def _long_poll_response(
        self,
        meta: StreamMeta,
        path: str,
        offset: int | str | None,
        after: int,
        cursor: str | None,
        chunk: Chunk,
    ) -> tuple[int, dict[str, str], bytes]:
        """A long-poll's answer when it has something: new messages, or the closed EOF."""
        out = self._chunk_headers(meta, chunk)
        if not chunk.closed:
            out["Stream-Cursor"] = next_cursor(cursor)
        if not chunk.messages and chunk.closed:
            return 204, out, b""
        out["ETag"] = _etag(path, offset, after, chunk)
        return 200, out, response_body(meta, chunk)

    async def _sse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        offset: int | str | None,
        cursor: str | None,
    ) -> None:
        async with self.engine.live(path) as session:
            meta = session.meta
            assert meta is not None
            out = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            binary = not is_text_like(meta.content_type)
            if binary:
                out["Stream-SSE-Data-Encoding"] = "base64"
            raw = encode_headers(out)
            raw.extend(COMMON_HEADERS)
            await send({"type": "http.response.start", "status": 200, "headers": raw})

            async def emit(event: bytes) -> None:
                await send({"type": "http.response.body", "body": event, "more_body": True})

            writer = raw_body_writer(scope)

            async def pump() -> None:
                after = start_position(offset, meta)
                wait_s = 0.0
                while True:
                    chunk = await session.next_chunk(after, wait_s)
                    wait_s = self.long_poll_timeout_s
                    if chunk is None:
                        if session.ending:
                            return
                        await emit(_control_event(after, next_cursor(cursor), True, False))
                        continue
                    event = b""
                    if chunk.messages:
                        event = self._data_event(meta, after, chunk, binary)
                    cur = None if chunk.closed else next_cursor(cursor)
                    event += _control_event(chunk.next_offset, cur, chunk.up_to_date, chunk.closed)
                    await emit(event)
                    after = chunk.next_offset
                    if chunk.closed:
                        return
                    if writer is not None and chunk.up_to_date:
                        follower = _SseFollower(self, meta, after, cursor, binary, writer)
                        after, timed_out = await follower.follow(session, wait_s)
                        if timed_out:
                            await emit(_control_event(after, next_cursor(cursor), True, False))

            pump_task = asyncio.create_task(pump())
            disconnect_task = asyncio.create_task(_wait_for_disconnect(receive))
            done, _ = await asyncio.wait(
                {pump_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (pump_task, disconnect_task):
                if task not in done:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if pump_task in done and disconnect_task not in done:
                with contextlib.suppress(ApiError):
                    pump_task.result()
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _data_event(self, meta: StreamMeta, after: int, chunk: Chunk, binary: bool) -> bytes:
        """The SSE data event for a chunk; readers following one stream get the same
        chunks, so each is encoded once (bounded memo of recent events)."""
        key = (meta.id, after, chunk.next_offset)
        event = self._recent_events.get(key)
        if event is None:
            event = _data_event(response_body(meta, chunk), binary)
            if len(event) <= MAX_MEMO_EVENT_BYTES:
                self._recent_events[key] = event
                if len(self._recent_events) > MAX_MEMO_EVENTS:
                    self._recent_events.popitem(last=False)
        return event

    @staticmethod
    def _chunk_headers(meta: StreamMeta, chunk: Chunk) -> dict[str, str]:
        out = {
            "Content-Type": meta.content_type,
            "Stream-Next-Offset": format_offset(chunk.next_offset),
        }
        if chunk.up_to_date:
            out["Stream-Up-To-Date"] = "true"
        if chunk.closed:
            out["Stream-Closed"] = "true"
        return out


class _TailFollower:
    """A live reader at the tail that the hub hands each commit to (hub `Follower`) while
    its task sleeps, until the follower releases it."""

    def __init__(self, after: int) -> None:
        self.after = after
        self._released: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def _follow(self, session: LiveSession, timeout_s: float) -> bool | None:
        """Follow from `after` until released (True) or until `timeout_s` passes (False);
        None if the reader is not exactly at a live tail (nothing was followed)."""
        if not session.follow(self, self.after):
            return None
        try:
            async with asyncio.timeout(timeout_s):
                await self._released
        except TimeoutError:
            return False
        finally:
            session.unfollow(self)
        return True

    def stop(self) -> None:
        """Release the reader's task: it reads and answers for itself from here."""
        if not self._released.done():
            self._released.set_result(None)


class _SseFollower(_TailFollower):
    """An SSE reader at the tail, written to by each commit directly while the writer
    accepts."""

    def __init__(
        self,
        app: StreamsApp,
        meta: StreamMeta,
        after: int,
        cursor: str | None,
        binary: bool,
        writer: RawBodyWriter,
    ) -> None:
        super().__init__(after)
        self._app = app
        self._meta = meta
        self._cursor = cursor
        self._binary = binary
        self._writer = writer

    async def follow(self, session: LiveSession, timeout_s: float) -> tuple[int, bool]:
        """Follow until a change cannot be written directly, or until `timeout_s` passes
        with none; returns the offset written up to, and whether the wait timed out."""
        released = await self._follow(session, timeout_s)
        return self.after, released is False

    def deliver(self, prev_tail: int, messages: list[Message], tail: int, closed: bool) -> bool:
        # Only the plain case: new messages right after what this reader has. Anything
        # else (a close, a gap, a change from another process) goes to the reader's task.
        if closed or not messages or prev_tail != self.after:
            self.stop()
            return False
        chunk = Chunk(messages, tail, True, False)
        event = self._app._data_event(self._meta, self.after, chunk, self._binary)
        event += _control_event(tail, next_cursor(self._cursor), True, False)
        if not self._writer.write(event):
            self.stop()
            return False
        self.after = tail
        return True


class _LongPollFollower(_TailFollower):
    """A long-poll reader at the tail, answered from the commit that brings its next
    messages, in one write with a `WholeResponseWriter`. It answers once, and only the
    plain case; for anything else its task reads and answers as usual."""

    def __init__(
        self,
        app: StreamsApp,
        path: str,
        meta: StreamMeta,
        offset: int | str | None,
        after: int,
        cursor: str | None,
        writer: WholeResponseWriter,
    ) -> None:
        super().__init__(after)
        self._app = app
        self._path = path
        self._meta = meta
        self._offset = offset
        self._cursor = cursor
        self._writer = writer
        self._answered = False

    async def wait(self, session: LiveSession, timeout_s: float) -> bool:
        """True once the reader has been answered; False if its task must answer (not at
        the tail, a change this follower declined, or `timeout_s` passed)."""
        await self._follow(session, timeout_s)
        return self._answered

    def deliver(self, prev_tail: int, messages: list[Message], tail: int, closed: bool) -> bool:
        # New messages right after the reader's offset, on a stream still open. A close, a
        # gap or a change from another process (no message bytes) is left to the task.
        if not closed and messages and prev_tail == self.after:
            chunk = Chunk(messages, messages[-1].offset, messages[-1].offset >= tail, False)
            status, out, body = self._app._long_poll_response(
                self._meta, self._path, self._offset, self.after, self._cursor, chunk
            )
            self._answered = self._writer.write(status, out, body)
        self.stop()
        return False  # a long-poll answers once


async def _send_whole(
    send: Send,
    writer: WholeResponseWriter | None,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    """A fixed-length response in one write when the connection allows it, else through
    the ASGI send."""
    if writer is not None and writer.write(status, headers, body):
        return
    await send_response(send, status, headers, body)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _etag(path: str, offset: int | str | None, after: int, chunk: Chunk) -> str:
    """Names (stream, start, end), and changes once the stream closes (spec/01 §A.13)."""
    start = "-1" if offset is None or offset == -1 else format_offset(after)
    encoded = base64.b64encode(path.encode()).decode()
    suffix = ":c" if chunk.closed else ""
    return f'"{encoded}:{start}:{format_offset(chunk.next_offset)}{suffix}"'


_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _data_event(payload: bytes, binary: bool) -> bytes:
    # Text is split on every line-break form so stored data cannot inject an SSE event.
    lines = [base64.b64encode(payload)] if binary else _LINE_BREAK.split(payload)
    return b"event: data\n" + b"".join(b"data:" + line + b"\n" for line in lines) + b"\n"


def _control_event(next_offset: int, cursor: str | None, up_to_date: bool, closed: bool) -> bytes:
    control: dict[str, object] = {"streamNextOffset": format_offset(next_offset)}
    if cursor is not None:
        control["streamCursor"] = cursor
    if up_to_date:
        control["upToDate"] = True
    if closed:
        control["streamClosed"] = True
    return b"event: control\ndata:" + orjson.dumps(control) + b"\n\n"

"""Stream appends served straight from the HTTP parser, without an ASGI round.

An append is the server's hottest request. Through ASGI each one costs a task, a scope dict,
two message dicts and two socket writes; that was most of the Python time per append. This
protocol is uvicorn's httptools protocol with one change: a POST to a stream path is parsed
here, handed to the append writer, and answered with one write when its batch commits
(`StreamsApp.prepare_append` applies the same checks the ASGI route does). Everything else,
including an append that arrives while an earlier request on the connection is still being
answered (HTTP pipelining), goes through ASGI unchanged.

The protocol also bounds every request's head (request line and headers) for all routes:
httptools buffers a header of any size, so without a limit one client could make the server
hold gigabytes. Over `MAX_REQUEST_HEAD_BYTES` the request is refused with 431.

It relies on uvicorn's protocol internals (`cycle`, `pipeline`, `on_response_complete`), so
uvicorn is pinned to a tested version in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from electric_agents.errors import ApiError
from electric_agents.http.responses import COMMON_HEADERS, error_response, header_map
from electric_agents.streams.writer import AppendResult

if TYPE_CHECKING:
    from electric_agents.http.app import ServerApp
    from electric_agents.http.streams_app import StreamsApp

log = logging.getLogger(__name__)

# Node's HTTP server refuses more than 16 KiB; this leaves room for large cookies and tokens.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# The ASGI scope extension that carries a `RawBodyWriter`.
RAW_BODY_WRITER = "electric.raw_body_writer"
# The ASGI scope extension that carries a `WholeResponseWriter`.
WHOLE_RESPONSE_WRITER = "electric.whole_response_writer"
# A raw write is declined above this much unsent output, leaving the wait to the ASGI send.
RAW_WRITE_BUFFER_LIMIT = 64 * 1024
# How long a connection refused for its head keeps draining input before it is closed.
REFUSED_CONNECTION_LINGER_S = 1.0

_COMMON_HEADER_BYTES = b"".join(name + b": " + value + b"\r\n" for name, value in COMMON_HEADERS)
_INTERNAL_ERROR = ApiError(500, "INTERNAL_SERVER_ERROR", "Internal server error")


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request whose head is too large."""


_HEAD_TOO_LARGE = ApiError(
    431,
    "REQUEST_HEADERS_TOO_LARGE",
    f"Request line and headers exceed {MAX_REQUEST_HEAD_BYTES} bytes",
)


class _NoEvent:
    """Stands in for the ASGI cycle's body event, which only ASGI receivers wait on."""

    @staticmethod
    def set() -> None:
        return None


_NO_EVENT = _NoEvent()


class DirectAppend:
    """One append being answered directly; takes the place of uvicorn's request cycle while
    it lasts (uvicorn reads `response_complete`, `disconnected`, `keep_alive` and
    `message_event` on shutdown, disconnect and pipelining)."""

    __slots__ = ("body", "disconnected", "keep_alive", "path", "response_complete", "too_large")

    message_event = _NO_EVENT

    def __init__(self, path: str, keep_alive: bool) -> None:
        self.path = path
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.too_large = False
        self.response_complete = False
        self.disconnected = False


class _CycleWriter:
    """Writes to a connection in place of uvicorn's ASGI send for one request cycle; every
    write is declined while the client is gone or the connection cannot take more now."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any, flow: Any) -> None:
        self._transport = transport
        self._cycle = cycle  # uvicorn's RequestResponseCycle for this response
        self._flow = flow

    def _connection_writable(self) -> bool:
        return not (
            self._cycle.disconnected or self._flow.write_paused or self._transport.is_closing()
        )


class RawBodyWriter(_CycleWriter):
    """Writes chunks of a streaming (chunked) response body straight to the connection.

    SSE fan-out uses it: a commit hands each following reader its event synchronously
    (streams/hub.py `Follower`), which costs one socket write per reader instead of waking
    a task and going through the ASGI send. It declines, so that the reader falls back to
    the ASGI send and its flow control, whenever that path would have to wait or could not
    write: the response is not chunked, the client is gone or the connection is congested.
    """

    __slots__ = ()

    def write(self, body: bytes) -> bool:
        """Write one body chunk; False, with nothing written, if it cannot be written now."""
        cycle = self._cycle
        if (
            not cycle.chunked_encoding
            or cycle.response_complete
            or not self._connection_writable()
            or self._transport.get_write_buffer_size() > RAW_WRITE_BUFFER_LIMIT
        ):
            return False
        self._transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True


def raw_body_writer(scope: dict[str, Any]) -> RawBodyWriter | None:
    """The connection's raw body writer for this response, when the server provides one."""
    extensions = scope.get("extensions")
    return extensions.get(RAW_BODY_WRITER) if extensions else None


class WholeResponseWriter(_CycleWriter):
    """Writes a whole fixed-length response in one socket write and completes uvicorn's
    request cycle, in place of the ASGI send's two writes (head, then body).

    Long-poll reads use it: the commit that a reader at the tail waits for hands it the new
    messages (streams/hub.py `Follower`), and its answer goes out from there, before the
    appenders are answered, without waking the reader's task. Once it has written, the
    application must return without sending anything.
    """

    __slots__ = ()

    def write(self, status: int, headers: dict[str, str], body: bytes) -> bool:
        """Write the response (the common headers are added); False, with nothing written,
        if it cannot be written now (then answer through the ASGI send as usual)."""
        cycle = self._cycle
        if (
            cycle.response_started
            or cycle.scope["method"] == "HEAD"
            or not self._connection_writable()
        ):
            return False
        data = response_bytes(status, cycle.default_headers, headers, body, cycle.keep_alive)
        # What uvicorn's send does on a complete response, in its order.
        cycle.response_started = True
        cycle.response_complete = True
        self._transport.write(data)
        cycle.message_event.set()
        if not cycle.keep_alive:
            self._transport.close()
        cycle.on_response()
        return True


def whole_response_writer(scope: dict[str, Any]) -> WholeResponseWriter | None:
    """The connection's whole-response writer for this request, when the server gives one."""
    extensions = scope.get("extensions")
    return extensions.get(WHOLE_RESPONSE_WRITER) if extensions else None


class DirectAppendProtocol(HttpToolsProtocol):
    server_app: ServerApp  # set on the subclass made by `protocol_for`

    # Bytes received since the current request's head began; None once its headers are in.
    # It bounds what httptools buffers for a head that never ends; the exact size of a
    # complete head is checked in `on_headers_complete`.
    _head_bytes: int | None = 0
    # The head being parsed is over the limit (the parser is stopped with _HeadTooLarge).
    _head_refused = False
    # Set once a head was refused: the rest of what the client sends is dropped.
    _discarding = False

    def data_received(self, data: bytes) -> None:
        if self._discarding or self.transport.is_closing():
            return
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        head_bytes = self._head_bytes
        still_too_large = head_bytes is not None and head_bytes > MAX_REQUEST_HEAD_BYTES
        # (A malformed head has been answered with 400 and the transport closed already.)
        if still_too_large and not self.transport.is_closing():
            self._refuse_request_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:
            self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        head_size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if head_size > MAX_REQUEST_HEAD_BYTES:
            # Raising stops the parser; uvicorn then calls `send_400_response`.
            self._head_refused = True
            raise _HeadTooLarge
        self._start_request()

    def send_400_response(self, msg: str) -> None:
        if self._head_refused:
            self._refuse_request_head()
        else:
            super().send_400_response(msg)

    def eof_received(self) -> bool | None:
        """A client may half-close after sending its last request (HTTP/1.0 tools do);
        the request in progress is still answered, then the connection is closed."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None
        cycle.keep_alive = False
        return True

    def _refuse_request_head(self) -> None:
        """Answer 431, then close. The close lingers: our side is shut down at once, but
        what the client is still sending is read and dropped for a moment, since closing
        with unread input sends a reset that can destroy the response before the client
        reads it. If an earlier request on the connection is still being answered, nothing
        can be slipped in ahead of its response, so the connection is just closed."""
        self._head_bytes = None
        self._discarding = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.transport.close()
            return
        self._write_response(_HEAD_TOO_LARGE.status, *error_response(_HEAD_TOO_LARGE), False)
        self.transport.write_eof()
        self.loop.call_later(REFUSED_CONNECTION_LINGER_S, self.transport.close)

    def _start_request(self) -> None:
        """Take a POST to a stream as a direct append; anything else goes to uvicorn."""
        streams = self._direct_streams_app()
        if streams is None:
            self._start_asgi_request()
            return
        path = self.server_app.direct_append_path(httptools.parse_url(self.url).path)
        if path is None:
            self._start_asgi_request()
            return
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.cycle = DirectAppend(path, keep_alive)  # type: ignore[assignment]

    def _start_asgi_request(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return
        # Live reads get writers that bypass the ASGI send: SSE for its body chunks,
        # long-poll for its whole answer.
        writer: _CycleWriter
        if b"live=sse" in self.url:
            name, writer = RAW_BODY_WRITER, RawBodyWriter(self.transport, cycle, self.flow)
        elif b"live=long-poll" in self.url:
            name = WHOLE_RESPONSE_WRITER
            writer = WholeResponseWriter(self.transport, cycle, self.flow)
        else:
            return
        self.scope.setdefault("extensions", {})[name] = writer  # type: ignore[literal-required]

    def _direct_streams_app(self) -> StreamsApp | None:
        """The stream app, when this request may be answered directly: a POST, with no
        earlier request on the connection still in progress, no upgrade, no 100-continue."""
        if self.parser.get_method() != b"POST" or self.expect_100_continue:
            return None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return None
        if self.parser.should_upgrade():
            return None
        app = self.server_app
        return app.streams_app if app.ready else None

    def on_body(self, body: bytes) -> None:
        exchange = self.cycle
        if type(exchange) is not DirectAppend:
            super().on_body(body)
            return
        if exchange.too_large:
            return
        exchange.body += body
        if len(exchange.body) > self.server_app.settings.max_append_bytes:
            # Refused now, as the ASGI route does, not after the whole upload; the rest of
            # the body is still read (and dropped), so the connection stays usable.
            exchange.too_large = True
            exchange.body = bytearray()
            self._refuse_oversized(exchange)

    def _refuse_oversized(self, exchange: DirectAppend) -> None:
        streams = self.server_app.streams_app
        assert streams is not None
        try:
            streams.prepare_append(exchange.path, header_map(self.headers), None)
        except ApiError as error:  # a producer header error, else 413
            self._answer_error(exchange, error)
            return
        raise AssertionError("prepare_append accepted a body over the limit")

    def on_message_complete(self) -> None:
        exchange = self.cycle
        if type(exchange) is not DirectAppend:
            super().on_message_complete()
            return
        if exchange.response_complete:
            return  # refused while its body was arriving
        streams = self.server_app.streams_app
        assert streams is not None
        headers = header_map(self.headers)
        body = bytes(exchange.body)
        exchange.body = bytearray()
        try:
            future = streams.submit_plain_append(exchange.path, headers, body)
        except ApiError as error:
            self._answer_error(exchange, error)
            return
        if future is None:
            task = self.loop.create_task(self._policy_append(streams, exchange, headers, body))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        future.add_done_callback(lambda done: self._append_done(exchange, done))

    def _append_done(self, exchange: DirectAppend, done: asyncio.Future[AppendResult]) -> None:
        error = done.exception()
        if error is None:
            result = done.result()
            self._answer(exchange, result.status, result.headers, b"")
        elif isinstance(error, ApiError):
            self._answer_error(exchange, error)
        else:
            log.error("append to %s failed", exchange.path, exc_info=error)
            self._answer_error(exchange, _INTERNAL_ERROR)

    async def _policy_append(
        self,
        streams: StreamsApp,
        exchange: DirectAppend,
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        """An append the mounting application's policy must check first (entity streams)."""
        try:
            result = await streams.append(exchange.path, headers, body)
        except ApiError as error:
            self._answer_error(exchange, error)
            return
        except Exception:
            log.exception("unhandled error on POST %s", exchange.path)
            self._answer_error(exchange, _INTERNAL_ERROR)
            return
        self._answer(exchange, result.status, result.headers, b"")
        await streams.after_append(exchange.path, headers, body)

    def _answer_error(self, exchange: DirectAppend, error: ApiError) -> None:
        self._answer(exchange, error.status, *error_response(error))

    def _answer(
        self, exchange: DirectAppend, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        """Write the whole response at once, then let uvicorn start the next request."""
        if exchange.disconnected or exchange.response_complete:
            return
        self._write_response(status, headers, body, exchange.keep_alive)
        exchange.response_complete = True
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _write_response(
        self, status: int, headers: dict[str, str], body: bytes, keep_alive: bool
    ) -> None:
        default_headers = self.server_state.default_headers
        self.transport.write(response_bytes(status, default_headers, headers, body, keep_alive))


def response_bytes(
    status: int,
    default_headers: list[tuple[bytes, bytes]],
    headers: dict[str, str],
    body: bytes,
    keep_alive: bool,
) -> bytes:
    """A whole HTTP/1.1 response as uvicorn's send would write it: status line, uvicorn's
    default headers, `headers`, the headers every response carries, the length, the body."""
    parts = [STATUS_LINE[status]]
    for name, value in default_headers:
        parts.append(name + b": " + value + b"\r\n")
    for name, text in headers.items():
        parts.append(f"{name.lower()}: {text}\r\n".encode("latin-1"))
    parts.append(_COMMON_HEADER_BYTES)
    if status not in (204, 304):
        parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def protocol_for(server_app: ServerApp) -> type[DirectAppendProtocol]:
    """The uvicorn `http` protocol class serving `server_app`'s appends directly."""
    attributes: dict[str, Any] = {"server_app": server_app}
    return type("ServerAppProtocol", (DirectAppendProtocol,), attributes)

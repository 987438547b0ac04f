"""`electric-agents serve|streams`: resolve settings, start the database, run the server."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from dataclasses import replace
from typing import NoReturn

from electric_agents.config import ConfigError, Settings, load_settings


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line and exit code 2, not a usage dump.
        print(f"electric-agents: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", help="bind port (default 4437; 0 picks a free port)")
    parser.add_argument("--data-dir", help="data directory (default ./.electric-agents)")
    parser.add_argument("--database-url", help="PostgreSQL URL; without it an embedded one runs")
    parser.add_argument("--long-poll-timeout-ms", help="long-poll and SSE idle timeout")
    parser.add_argument("--max-append-bytes", help="largest accepted request body")
    parser.add_argument("--base-url", help="public base URL handed out in callbacks")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="electric-agents", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the agents server (streams at the root)")
    _add_server_flags(serve)
    serve.add_argument(
        "--mock-agent",
        action="store_true",
        default=None,
        help="register the built-in mock `chat` agent (or ELECTRIC_AGENTS_MOCK_AGENT=1)",
    )
    serve.add_argument(
        "--event-sources",
        help="JSON file with the event-source catalog (or ELECTRIC_AGENTS_EVENT_SOURCES)",
    )
    streams = commands.add_parser(
        "streams", help="run the Durable Streams server alone, at /v1/stream"
    )
    _add_server_flags(streams)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            database_url=args.database_url,
            long_poll_timeout_ms=args.long_poll_timeout_ms,
            max_append_bytes=args.max_append_bytes,
            base_url=args.base_url,
            stream_prefix="/v1/stream" if args.command == "streams" else "",
            subscriptions=True,
            mock_agent=getattr(args, "mock_agent", None),
            event_sources=getattr(args, "event_sources", None),
        )
    except ConfigError as error:
        print(f"electric-agents: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_server(settings, banner=args.command)


def _bind(settings: Settings) -> tuple[socket.socket, Settings]:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as error:
        sock.close()
        raise ConfigError(
            f"cannot bind {settings.host}:{settings.port}: {error.strerror}"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock, replace(settings, port=sock.getsockname()[1])


def _database_problem(database_url: str) -> str | None:
    """Why the database cannot be reached, or None if a connection succeeds."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(database_url, timeout=10)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return str(error) or type(error).__name__
    return None


def run_server(settings: Settings, *, banner: str) -> int:
    import uvicorn

    from electric_agents.db.embedded import EmbeddedPostgres
    from electric_agents.http.app import ServerApp
    from electric_agents.http.direct import protocol_for
    from electric_agents.http.server import AppServer

    try:
        sock, settings = _bind(settings)
    except ConfigError as error:
        print(f"electric-agents: error: {error}", file=sys.stderr)
        return 2

    embedded: EmbeddedPostgres | None = None
    database_url = settings.database_url
    if database_url is not None:
        problem = _database_problem(database_url)
        if problem:
            sock.close()
            print(f"electric-agents: error: cannot connect to database: {problem}", file=sys.stderr)
            return 2
    else:
        embedded = EmbeddedPostgres(settings.data_dir / "pg")
        database_url = embedded.start()
    try:
        app = ServerApp(settings, database_url)
        root = settings.public_url + settings.stream_prefix
        if banner == "streams":
            app.on_ready = lambda: print(f"Durable Streams server running at {root}", flush=True)
        else:
            app.on_ready = lambda: print(
                f"Electric Agents server running at {settings.public_url}", flush=True
            )
        config = uvicorn.Config(
            app,
            loop="uvloop",
            # Appends are answered straight from the parser; the rest goes through ASGI.
            http=protocol_for(app),
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=5,
            proxy_headers=False,
        )
        server = AppServer(config, app)
        # uvicorn handles SIGINT/SIGTERM while it serves, then re-raises the signal against
        # the handlers it found. Make those no-ops so we get here and stop Postgres cleanly.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        sock.close()
        if embedded is not None:
            embedded.stop()

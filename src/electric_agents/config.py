"""Settings from command-line flags and environment variables.

Precedence: an explicit flag, then the first non-empty environment variable of the listed
names (spec/02 §1.2 reads them trimmed, empty meaning unset), then the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from electric_agents.agents.event_source_catalog import EventSourceCatalog


class ConfigError(ValueError):
    """An invalid setting; the CLI prints it on one line and exits with code 2."""


DEFAULT_PORT = 4437
DEFAULT_LONG_POLL_TIMEOUT_MS = 30_000
DEFAULT_MAX_APPEND_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: Path(".electric-agents"))
    database_url: str | None = None
    long_poll_timeout_ms: int = DEFAULT_LONG_POLL_TIMEOUT_MS
    max_append_bytes: int = DEFAULT_MAX_APPEND_BYTES
    # Public base URL used in URLs the server hands out (webhook callbacks, JWKS); defaults
    # to the bound address.
    base_url: str | None = None
    # The URL prefix where the stream engine is mounted: "" for `serve`, "/v1/stream" for
    # the standalone `streams` command.
    stream_prefix: str = ""
    subscriptions: bool = True
    # One tenant per process scopes every registry row (spec/02 §5.7).
    tenant_id: str = "default"
    # Without an `electric-principal` header, act as `system:dev-local` (spec/02 §5.1) unless
    # the deployment requires the header.
    require_principal: bool = False
    # The built-in mock `chat` agent (spec/02 §4.14) and its handler route.
    mock_agent: bool = False
    # The event-source catalog (`--event-sources FILE`, spec/03 §5.9); None: no catalog.
    event_sources: EventSourceCatalog | None = field(default=None, compare=False)

    @property
    def public_url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def env_value(*names: str, environ: dict[str, str] | None = None) -> str | None:
    """The first non-empty (after trimming) value among the given variable names."""
    env = os.environ if environ is None else environ
    for name in names:
        raw = env.get(name)
        if raw is not None and raw.strip():
            return raw.strip()
    return None


def parse_port(raw: str | int, *, allow_zero: bool = False) -> int:
    text = str(raw).strip()
    low = 0 if allow_zero else 1
    if not text.isdigit() or not (low <= int(text) <= 65535):
        raise ConfigError(f'Invalid port "{raw}". Expected an integer between {low} and 65535.')
    return int(text)


def parse_positive_int(raw: str | int, what: str) -> int:
    text = str(raw).strip()
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError(f'Invalid {what} "{raw}". Expected a positive integer.')
    return int(text)


def parse_database_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("postgres", "postgresql"):
        raise ConfigError(f'Invalid Postgres URL: "{raw}"')
    return raw


def parse_base_url(raw: str) -> str:
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f'Invalid base URL: "{raw}"')
    return raw.rstrip("/")


def load_settings(
    *,
    host: str | None = None,
    port: str | int | None = None,
    data_dir: str | None = None,
    database_url: str | None = None,
    long_poll_timeout_ms: str | int | None = None,
    max_append_bytes: str | int | None = None,
    base_url: str | None = None,
    stream_prefix: str = "",
    subscriptions: bool = True,
    mock_agent: bool | None = None,
    event_sources: str | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Resolve settings from explicit values (flags) and the environment."""

    def pick(explicit: object, *names: str) -> str | None:
        if explicit is not None and str(explicit).strip():
            return str(explicit).strip()
        return env_value(*names, environ=environ)

    raw_port = pick(port, "ELECTRIC_AGENTS_PORT", "PORT")
    raw_timeout = pick(long_poll_timeout_ms, "ELECTRIC_AGENTS_LONG_POLL_TIMEOUT_MS")
    raw_max = pick(max_append_bytes, "ELECTRIC_AGENTS_MAX_APPEND_BYTES")
    raw_db = pick(database_url, "ELECTRIC_AGENTS_DATABASE_URL", "DATABASE_URL")
    raw_base = pick(base_url, "ELECTRIC_AGENTS_BASE_URL", "BASE_URL")
    tenant = env_value(
        "ELECTRIC_AGENTS_SERVICE",
        "SERVICE",
        "ELECTRIC_AGENTS_TENANT_ID",
        "TENANT_ID",
        environ=environ,
    )
    require_principal = (
        env_value("ELECTRIC_AGENTS_REQUIRE_PRINCIPAL", environ=environ) or ""
    ).lower() == "true"
    if mock_agent is None:
        raw_mock = env_value("ELECTRIC_AGENTS_MOCK_AGENT", environ=environ) or ""
        mock_agent = raw_mock.lower() in ("1", "true", "yes", "on")
    raw_event_sources = pick(event_sources, "ELECTRIC_AGENTS_EVENT_SOURCES")
    return Settings(
        host=pick(host, "ELECTRIC_AGENTS_HOST", "HOST") or "127.0.0.1",
        port=parse_port(raw_port, allow_zero=True) if raw_port else DEFAULT_PORT,
        data_dir=Path(pick(data_dir, "ELECTRIC_AGENTS_DATA_DIR") or ".electric-agents"),
        database_url=parse_database_url(raw_db) if raw_db else None,
        long_poll_timeout_ms=(
            parse_positive_int(raw_timeout, "long-poll timeout")
            if raw_timeout
            else DEFAULT_LONG_POLL_TIMEOUT_MS
        ),
        max_append_bytes=(
            parse_positive_int(raw_max, "max append size") if raw_max else DEFAULT_MAX_APPEND_BYTES
        ),
        base_url=parse_base_url(raw_base) if raw_base else None,
        stream_prefix=stream_prefix,
        subscriptions=subscriptions,
        tenant_id=tenant or "default",
        require_principal=require_principal,
        mock_agent=mock_agent,
        event_sources=load_event_sources(raw_event_sources) if raw_event_sources else None,
    )


def load_event_sources(path: str) -> EventSourceCatalog:
    from electric_agents.agents.event_source_catalog import CatalogError, load_catalog

    try:
        return load_catalog(path)
    except CatalogError as error:
        raise ConfigError(str(error)) from None

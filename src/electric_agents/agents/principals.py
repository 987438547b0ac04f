"""Principals: who is acting (spec/02 §5). A principal is `<kind>:<id>`, addressed by the URL
`/principal/<encodeURIComponent(key)>`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

PRINCIPAL_KINDS = ("user", "agent", "service", "system")
DEV_PRINCIPAL_KEY = "system:dev-local"
SYSTEM_PRINCIPAL_KEYS = frozenset({"system:framework", "system:auth-sync", DEV_PRINCIPAL_KEY})
_PRINCIPAL_URL_PREFIX = "/principal/"


@dataclass(frozen=True)
class Principal:
    kind: str
    id: str

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"

    @property
    def url(self) -> str:
        # JavaScript's encodeURIComponent leaves exactly these unescaped.
        return _PRINCIPAL_URL_PREFIX + quote(self.key, safe="-_.!~*'()")

    @property
    def is_system(self) -> bool:
        return self.key in SYSTEM_PRINCIPAL_KEYS


DEV_PRINCIPAL = Principal("system", "dev-local")


def parse_principal_key(key: str) -> Principal | None:
    """`kind:id` with a known kind and a non-empty id without `/`; None otherwise."""
    kind, sep, ident = key.partition(":")
    if not sep or kind not in PRINCIPAL_KINDS or not ident or "/" in ident:
        return None
    return Principal(kind, ident)


def parse_principal(value: str) -> Principal | None:
    """A principal from a header value: a key, or a principal URL (encoded or legacy raw)."""
    value = value.strip()
    if value.startswith(_PRINCIPAL_URL_PREFIX):
        segment = value[len(_PRINCIPAL_URL_PREFIX) :]
        if not segment or "/" in segment:
            return None
        return parse_principal_key(unquote(segment))
    return parse_principal_key(value)

"""What the server signs: webhook deliveries (Ed25519, published as a JWKS) and the callback
tokens it hands to a wake's consumer (HMAC-SHA256).

Both keys are created once and kept in `server_secrets`, so signatures and outstanding
tokens stay valid across restarts and across server processes sharing the database (the
reference keeps its token key in memory, so every restart invalidated all tokens).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from electric_agents.db.secrets import load_or_create_secret
from electric_agents.errors import ApiError

SIGNING_KEY_NAME = "ds_webhook_signing_key_ed25519"
TOKEN_KEY_NAME = "ds_callback_token_key"
# A consumer may hold a wake for hours (renewing its lease); generation and wake id fence
# a token long before it expires.
TOKEN_TTL_S = 24 * 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WebhookSigner:
    """Signs `<t>.<raw body>` and publishes the public key at `__ds/jwks.json`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.x = b64url(private_key.public_key().public_bytes_raw())
        # RFC 7638 thumbprint: the required members in lexicographic order, no spaces.
        thumbprint = f'{{"crv":"Ed25519","kty":"OKP","x":"{self.x}"}}'
        self.kid = "ds_" + b64url(hashlib.sha256(thumbprint.encode()).digest())

    @classmethod
    async def load_or_create(cls, pool: asyncpg.Pool) -> WebhookSigner:
        seed = await load_or_create_secret(
            pool, SIGNING_KEY_NAME, lambda: b64url(Ed25519PrivateKey.generate().private_bytes_raw())
        )
        return cls(Ed25519PrivateKey.from_private_bytes(b64url_decode(seed)))

    def jwks(self) -> dict[str, Any]:
        key = {"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid}
        return {"keys": [{**key, "use": "sig", "alg": "EdDSA"}]}

    def signature_header(self, body: bytes, *, now: float | None = None) -> str:
        """`Webhook-Signature: t=<unix>,kid=<kid>,ed25519=<base64url, no padding>`."""
        timestamp = int(time.time() if now is None else now)
        signature = self._private_key.sign(f"{timestamp}.".encode() + body)
        return f"t={timestamp},kid={self.kid},ed25519={b64url(signature)}"


@dataclass(frozen=True)
class TokenClaims:
    subscription_id: str
    generation: int
    wake_id: str


class CallbackTokens:
    """`base64url(json claims) + "." + base64url(HMAC-SHA256)`, as the reference shapes them.

    The claims name the wake (`jti` = wake id, `epoch` = generation), so a token is fenced by
    the wake it was minted for and never authorizes a later one.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    @classmethod
    async def load_or_create(cls, pool: asyncpg.Pool) -> CallbackTokens:
        key = await load_or_create_secret(
            pool, TOKEN_KEY_NAME, lambda: b64url(secrets.token_bytes(32))
        )
        return cls(b64url_decode(key))

    def mint(self, subscription_id: str, generation: int, wake_id: str) -> str:
        claims = {
            "sub": f"subscription:{subscription_id}",
            "epoch": generation,
            "exp": int(time.time()) + TOKEN_TTL_S,
            "jti": wake_id,
        }
        payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, subscription_id: str) -> TokenClaims:
        payload, _, mac = token.partition(".")
        expected = self._mac(payload).encode()
        if not payload or not hmac.compare_digest(mac.encode("utf-8", "replace"), expected):
            raise _token_error("TOKEN_INVALID", "Token invalid")
        try:
            claims = json.loads(b64url_decode(payload))
            subject, generation = claims["sub"], claims["epoch"]
            wake_id, expires = claims["jti"], claims["exp"]
        except (ValueError, KeyError, TypeError):
            raise _token_error("TOKEN_INVALID", "Token invalid") from None
        if subject != f"subscription:{subscription_id}":
            raise _token_error("TOKEN_INVALID", "Token invalid")
        if not isinstance(expires, int) or time.time() > expires:
            raise _token_error("TOKEN_EXPIRED", "Token expired")
        if not isinstance(generation, int) or not isinstance(wake_id, str):
            raise _token_error("TOKEN_INVALID", "Token invalid")
        return TokenClaims(subscription_id, generation, wake_id)

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._key, payload.encode("utf-8", "replace"), hashlib.sha256)
        return b64url(digest.digest())


def _token_error(code: str, message: str) -> ApiError:
    return ApiError(401, code, message)

"""The web UI's session: a cookie signed with a server secret (HMAC-SHA256), holding who
signed in and with which API key (its id, never the key), and a random nonce from which
the CSRF token of every form is derived. A session is checked against the hub on every
request, so a revoked key, a disabled account or signing out (the hub forgets the nonce)
ends it from the next page on, for every copy of its cookie."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "dm_session"
MAX_AGE = 7 * 24 * 3600  # seconds a session lasts after sign-in


@dataclass(frozen=True)
class Session:
    user: str | None  # None: not signed in (the session still carries a CSRF nonce)
    key_id: str | None
    nonce: str
    issued: int

    @classmethod
    def new(cls, user: str | None = None, key_id: str | None = None) -> Session:
        return cls(user, key_id, secrets.token_urlsafe(18), int(time.time()))


def mac(secret: bytes, data: bytes) -> str:
    return base64.urlsafe_b64encode(hmac.new(secret, data, hashlib.sha256).digest()).decode()


def encode(secret: bytes, s: Session) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(
        [s.user, s.key_id, s.nonce, s.issued]).encode()).decode()
    return f"{payload}.{mac(secret, payload.encode())}"


def decode(secret: bytes, value: str | None) -> Session | None:
    """The session a cookie holds; None if it is missing, forged or too old."""
    if not value or len(value) > 1024:
        return None
    payload, _, given = value.partition(".")
    if not hmac.compare_digest(given.encode(), mac(secret, payload.encode()).encode()):
        return None
    try:
        user, kid, nonce, issued = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return None
    if not isinstance(issued, int) or time.time() - issued > MAX_AGE:
        return None
    return Session(user, kid, str(nonce), issued)


def csrf_token(secret: bytes, s: Session) -> str:
    """The token every form of this session carries: tied to the session's nonce, so a
    page of another site can neither read nor guess it."""
    return mac(secret, b"csrf:" + s.nonce.encode())


def csrf_ok(secret: bytes, s: Session, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(str(token).encode(),
                                               csrf_token(secret, s).encode())


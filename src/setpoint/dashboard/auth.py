"""Dashboard sessions: the master key is presented once (login form), then a signed cookie.

The cookie is `<payload>.<signature>`: payload = base64url JSON {"sub", "iat", "exp"}, signature =
HMAC-SHA256 over the payload with a key *derived from the master key* (never the key itself). So
every worker of `setpoint serve --workers N` accepts a cookie issued by any other, and changing the
master key invalidates every session at once. The cookie is HttpOnly, SameSite=Strict, scoped to
`/ui`, and Secure when the request came over HTTPS. Logout clears it; a copied cookie stays valid
until it expires (`SESSION_TTL_S`), as with any stateless session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

import orjson

__all__ = ["COOKIE_NAME", "SESSION_TTL_S", "Session", "SessionSigner"]

COOKIE_NAME = "setpoint_ui"
SESSION_TTL_S = 12 * 3600
_CONTEXT = b"setpoint dashboard session v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Session:
    subject: str  # "master"
    issued_at: float
    expires_at: float


class SessionSigner:
    def __init__(self, master_key: str, ttl_s: float = SESSION_TTL_S) -> None:
        # A derived key: the cookie never carries anything from which the master key could be read.
        self._key = hmac.new(master_key.encode("utf-8", "surrogatepass"), _CONTEXT, hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, subject: str, now: float | None = None) -> str:
        t = time.time() if now is None else now
        payload = _b64(orjson.dumps({"sub": subject, "iat": int(t), "exp": int(t + self.ttl_s)}))
        return f"{payload}.{self._sign(payload)}"

    def verify(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None if it is missing, forged, tampered with or expired."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 512:
            return None
        payload, sig = cookie.split(".")
        try:
            if not hmac.compare_digest(sig.encode("ascii"), self._sign(payload).encode("ascii")):
                return None
            data = orjson.loads(_unb64(payload))
        except (ValueError, UnicodeError):
            return None
        if not isinstance(data, dict):
            return None
        sub, iat, exp = data.get("sub"), data.get("iat"), data.get("exp")
        if not isinstance(sub, str) or not isinstance(iat, int) or not isinstance(exp, int):
            return None
        t = time.time() if now is None else now
        if exp <= t or iat > t + 60 or exp - iat > self.ttl_s:
            return None
        return Session(sub, float(iat), float(exp))

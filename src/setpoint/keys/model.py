"""Virtual keys: what a key may do, and how its secret is made and hashed."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

__all__ = ["KEY_PREFIX", "KeyInfo", "hash_key", "key_matches", "new_key_secret"]

KEY_PREFIX = "sk-sp-"


def new_key_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    """SHA-256 of the secret. Secrets are 256-bit random, so a fast unsalted hash is safe to store."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True, frozen=True)
class KeyInfo:
    id: str
    name: str
    team: str | None = None
    user: str | None = None
    models: frozenset[str] | None = None  # None: every model
    metadata: dict[str, str] = field(default_factory=dict)
    hint: str = ""  # first characters of the secret, for display only
    priority: str = "default"  # critical | default | sheddable (a request header may lower it, not raise it)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


def key_matches(presented: str, expected: str | None) -> bool:
    """Constant-time comparison of a presented secret with the master key (admin API, metrics,
    dashboard); False when no master key is configured. A header that is not UTF-8 arrives with
    surrogate escapes: it is compared as it is (and fails), never an encoding error."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))

"""Virtual keys: what a key may do, and how its secret is made and hashed."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

__all__ = ["KEY_PREFIX", "KeyInfo", "hash_key", "new_key_secret"]

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

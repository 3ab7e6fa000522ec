"""`auth`: the first stage. Resolves the bearer secret to a virtual key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from setpoint.errors import AuthenticationError
from setpoint.keys.auth import KeyAuthenticator
from setpoint.keys.model import KeyInfo
from setpoint.proxy.context import RequestContext
from setpoint.types import Next, Reply

__all__ = ["AuthStage", "bearer_secret"]


def bearer_secret(headers: Mapping[str, str]) -> str:
    getall = getattr(headers, "getall", None)  # a request's headers (a multidict); a plain dict has one of each
    if getall is not None and len(getall("Authorization", ())) > 1:
        # Which one counts would be a guess (a proxy in front may read the other): refuse both.
        raise AuthenticationError("send one Authorization header, not several")
    value = headers.get("Authorization") or ""
    if value[:7].lower() == "bearer ":
        secret = value[7:].strip()
    else:
        secret = (headers.get("api-key") or headers.get("x-api-key") or "").strip()
    if not secret:
        raise AuthenticationError(
            "missing API key: send 'Authorization: Bearer <key>' with a setpoint virtual key"
        )
    return secret


class AuthStage:
    name: ClassVar[str] = "auth"

    def __init__(self, authenticator: KeyAuthenticator) -> None:
        self._auth = authenticator

    async def authenticate(self, headers: Mapping[str, str]) -> KeyInfo:
        info = await self._auth.resolve(bearer_secret(headers))
        if info is None:
            # Never echo the presented secret back.
            raise AuthenticationError("invalid or revoked API key")
        return info

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        ctx.key = await self.authenticate(ctx.headers)
        return await call_next(ctx)

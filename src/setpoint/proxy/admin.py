"""Admin HTTP API (`/admin/...`), protected by the master key from config/env."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from setpoint.errors import AuthenticationError, InvalidRequestError, NotFoundError, PermissionDeniedError, SetpointError
from setpoint.keys.model import key_matches
from setpoint.logstore.usage import parse_day, usage_report
from setpoint.proxy.exchange import read_body
from setpoint.proxy.routes import error_response
from setpoint.wire.request import parse_json_object

if TYPE_CHECKING:
    from setpoint.proxy.gateway import Gateway

__all__ = ["AdminHandlers"]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _str_list(body: dict[str, Any], name: str) -> list[str] | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise InvalidRequestError(f"'{name}' must be an array of strings", param=name)
    return v


def _opt_str(body: dict[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise InvalidRequestError(f"'{name}' must be a string", param=name)
    return v


class AdminHandlers:
    def __init__(self, gw: Gateway) -> None:
        self._gw = gw

    def _check(self, request: web.Request) -> None:
        master = self._gw.runtime.master_key
        if not master:
            raise PermissionDeniedError("the admin API is disabled: set admin.master_key (e.g. ${SETPOINT_MASTER_KEY})")
        value = request.headers.get("Authorization", "")
        presented = value[7:].strip() if value[:7].lower() == "bearer " else ""
        if not key_matches(presented, master):
            raise AuthenticationError("admin endpoints need 'Authorization: Bearer <master key>'")

    async def list_keys(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
        except SetpointError as err:
            return error_response(err)
        return _json({"object": "list", "data": await asyncio.to_thread(self._gw.key_store.list)})

    async def create_key(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
            body = parse_json_object(await read_body(request, self._gw.runtime.config.server.max_body_bytes))
            name = _opt_str(body, "name") or "unnamed"
            models = _str_list(body, "models")
            for m in models or ():
                if m != "*" and m not in self._gw.runtime.routes:
                    raise InvalidRequestError(f"unknown model '{m}'", param="models")
            metadata = body.get("metadata") or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise InvalidRequestError("'metadata' must be an object of strings", param="metadata")
            secret, info = await asyncio.to_thread(
                self._gw.key_store.create, name=name, team=_opt_str(body, "team"), user=_opt_str(body, "user"),
                models=models, metadata=metadata,
            )
        except SetpointError as err:
            return error_response(err)
        return _json({"id": info.id, "key": secret, "name": info.name, "team": info.team, "user": info.user,
                      "models": sorted(info.models) if info.models else ["*"], "hint": info.hint}, status=201)

    async def usage(self, request: web.Request) -> web.Response:
        """GET /admin/usage?by=team|key|user|model|day&since=YYYY-MM-DD&until=YYYY-MM-DD"""
        try:
            self._check(request)
            q = request.query
            by = q.get("by", "team")
            since, until = parse_day(q.get("since"), "since"), parse_day(q.get("until"), "until")
            request_log = self._gw.request_log

            def report() -> list[dict[str, Any]]:
                request_log.flush(5.0)  # this process's latest requests too
                return usage_report(request_log.reader, by, since, until)

            rows = await asyncio.to_thread(report)
        except SetpointError as err:
            return error_response(err)
        return _json({"object": "list", "by": by, "data": rows})

    async def revoke_key(self, request: web.Request) -> web.Response:
        try:
            self._check(request)
            key_id = request.match_info["key_id"]
            if not await asyncio.to_thread(self._gw.key_store.revoke, key_id):
                raise NotFoundError(f"no active key with id '{key_id}'")
        except SetpointError as err:
            return error_response(err)
        self._gw.authenticator.forget(key_id)
        return _json({"id": key_id, "revoked": True})

"""The gateway: everything built from a `Runtime`, and the aiohttp application that serves it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from aiohttp import web
from aiohttp.typedefs import Handler

from setpoint.accounting.tokens import preload as preload_tokenizer

from setpoint.config.compile import Runtime
from setpoint.errors import MethodNotAllowedError, NotFoundError
from setpoint.keys.auth import KeyAuthenticator
from setpoint.keys.store import SqliteKeyStore
from setpoint.logstore.request_log import RequestLog
from setpoint.observability.service import MetricsService
from setpoint.observability.tracing import Tracer
from setpoint.policy.caller import Resilience
from setpoint.policy.pipeline import build_pipelines
from setpoint.policy.stages.cache import CacheStage
from setpoint.policy.stages.auth import AuthStage
from setpoint.proxy.admin import AdminHandlers
from setpoint.proxy.routes import ApiHandlers, error_response
from setpoint.types import Stage

log = logging.getLogger("setpoint.gateway")

__all__ = ["Gateway", "build_app"]


class Gateway:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        cfg = runtime.config
        runtime.data_dir.mkdir(parents=True, exist_ok=True)
        self.key_store = SqliteKeyStore(runtime.data_dir / "keys.db")
        self.authenticator = KeyAuthenticator(
            runtime.static_keys, self.key_store, runtime.clock, cfg.server.auth_cache_ttl_s
        )
        self.auth_stage = AuthStage(self.authenticator)
        self.request_log = RequestLog(runtime.data_dir, cfg.logging, clock=runtime.clock.now)
        self.resilience = Resilience(runtime.config.resilience, runtime.clock)
        obs = cfg.observability
        self.metrics = MetricsService(self) if obs.metrics else None
        self.tracer = Tracer(obs.tracing) if obs.tracing.enabled else None
        self.stages: dict[str, Stage] = {}  # the policy stages in use, by name (for metrics and the dashboard)
        self.pipelines = build_pipelines(self.auth_stage, runtime, self.resilience,
                                         on_stage=lambda st: self.stages.__setitem__(st.name, st))
        self.api = ApiHandlers(self, self.pipelines)  # served by the edge, and by aiohttp

    async def start(self) -> None:
        self.request_log.start()
        if self.metrics is not None:
            await self.metrics.start()
        await self.runtime.state.start()
        cfg = self.runtime.config
        if cfg.budgets or any(r.tpm or r.input_tpm or r.output_tpm for r in cfg.rate_limits):
            await asyncio.to_thread(preload_tokenizer)  # counted on the request path: load it now
        for p in self.runtime.providers.values():
            await p.start()

    async def stop(self) -> None:
        """Stop everything in order. A step that fails is logged and the rest still run; the
        request log stops last and always: it drains acknowledged records and its spool."""
        try:
            for p in self.runtime.providers.values():
                await _logged(f"closing provider {p.name}", p.aclose())
            cache = self.stages.get("cache")
            if isinstance(cache, CacheStage):
                await _logged("draining cache writes", cache.aclose())  # before the store under them closes
            await _logged("closing the state store", self.runtime.state.aclose())
            if self.metrics is not None:
                await _logged("stopping metrics", self.metrics.stop())
            if self.tracer is not None:  # exports what is still buffered
                await _logged("flushing traces", asyncio.to_thread(self.tracer.shutdown))
        finally:
            self.request_log.stop()


async def _logged(what: str, step: Awaitable[None]) -> None:
    try:
        await step
    except Exception:  # noqa: BLE001 - shutdown goes on; the log says what failed
        log.exception("shutdown: %s failed", what)


@web.middleware
async def _unroutable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request-target no route can match (`CONNECT host:port`, `OPTIONS *`) gets the OpenAI
    error shape too, not aiohttp's text page (every other unknown path has the catch-all route)."""
    if request.match_info.http_exception is not None:
        return error_response(NotFoundError(f"unsupported endpoint: {request.method} {request.raw_path[:200]}"))
    return await handler(request)


def build_app(gw: Gateway) -> web.Application:
    max_body = gw.runtime.config.server.max_body_bytes
    app = web.Application(client_max_size=max_body, middlewares=[_unroutable])
    api = gw.api
    admin = AdminHandlers(gw)
    r = app.router
    for prefix in ("/v1", ""):
        r.add_post(f"{prefix}/chat/completions", api.chat)
        r.add_post(f"{prefix}/embeddings", api.embeddings)
        r.add_get(f"{prefix}/models", api.models)
        r.add_get(f"{prefix}/models/{{model}}", api.model)
    r.add_get("/admin/keys", admin.list_keys)
    r.add_post("/admin/keys", admin.create_key)
    r.add_delete("/admin/keys/{key_id}", admin.revoke_key)
    r.add_get("/admin/usage", admin.usage)

    async def health(request: web.Request) -> web.Response:
        request_log = gw.request_log
        # Serving continues while the log store is down (records wait in the spool): still "ok".
        # Unauthenticated, so no error text (it could name the database host); see the gateway log.
        return web.json_response({"status": "ok", "spool_pending_bytes": request_log.pending_bytes,
                                  "log_store_ok": request_log.last_error is None,
                                  "log_lag_s": round(request_log.lag_s, 3)})

    r.add_get("/health", health)
    if gw.metrics is not None:
        r.add_get("/metrics", gw.metrics.handle)

    from setpoint.dashboard import mount_dashboard  # noqa: PLC0415 - loads jinja2 only here
    mount_dashboard(app, gw)  # the dashboard at /ui

    # Last: anything unmatched gets an OpenAI-shaped 404/405 instead of aiohttp's HTML page.
    known = {res.canonical for res in r.resources()}

    async def unmatched(request: web.Request) -> web.Response:
        if request.path in known:
            return error_response(MethodNotAllowedError(f"method {request.method} is not allowed on {request.path}"))
        return error_response(NotFoundError(f"unsupported endpoint: {request.method} {request.path}"))

    r.add_route("*", "/{tail:.*}", unmatched)

    async def on_startup(app: web.Application) -> None:
        await gw.start()

    async def on_cleanup(app: web.Application) -> None:
        await gw.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app

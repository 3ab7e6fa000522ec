"""`setpoint sim-provider`: the simulated upstream as a standalone OpenAI-compatible HTTP server,
so any gateway (ours or a peer) can be pointed at the same deterministic, fault-injecting upstream."""

from __future__ import annotations

import orjson
from aiohttp import web

from setpoint.clock import Clock, RealClock
from setpoint.config.schema import SimulatedProviderConfig
from setpoint.providers.simulated.engine import SimPlan, SimulatedEngine

__all__ = ["build_sim_app"]


def _bad_request(message: str) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})
    return web.Response(status=400, body=body, content_type="application/json")


async def _play(request: web.Request, plan: SimPlan, clock: Clock, is_stream: bool) -> web.StreamResponse:
    if plan.delay_s > 0:
        await clock.sleep(plan.delay_s)
    if plan.status != 200 or not is_stream:
        return web.Response(status=plan.status, body=plan.body, headers=plan.headers, content_type="application/json")
    resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    for ev in plan.events:
        if ev.delay_s > 0:
            await clock.sleep(ev.delay_s)
        await resp.write(ev.data)
    if plan.is_cut:
        # Drop the connection without finishing the chunked body: the client sees a broken stream.
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


def build_sim_app(cfg: SimulatedProviderConfig, clock: Clock | None = None) -> web.Application:
    engine = SimulatedEngine(cfg)
    clk = clock or RealClock()

    async def read_body(request: web.Request) -> dict | None:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) else None

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        if body is None:
            return _bad_request("body must be a JSON object")
        is_stream = body.get("stream") is True
        return await _play(request, engine.plan_chat(body, is_stream), clk, is_stream)

    async def embeddings(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        if body is None:
            return _bad_request("body must be a JSON object")
        return await _play(request, engine.plan_embeddings(body), clk, False)

    async def models(request: web.Request) -> web.Response:
        data = {"object": "list", "data": [{"id": "simulated", "object": "model", "created": 0, "owned_by": "setpoint"}]}
        return web.json_response(data, dumps=lambda d: orjson.dumps(d).decode())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    return app

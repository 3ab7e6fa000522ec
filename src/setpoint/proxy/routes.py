"""Thin handlers: raw request -> context -> pipeline -> response, and one request record each."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from setpoint.accounting.usage_fallback import fill_missing_usage, unary_output_text
from setpoint.errors import (
    InternalError,
    ModelNotFoundError,
    ProviderResponseError,
    SetpointError,
)
from setpoint.proxy.context import RequestContext
from setpoint.proxy.exchange import AiohttpExchange, Exchange
from setpoint.proxy.streaming import StreamRelay
from setpoint.types import Next, Reply, Usage
from setpoint.wire.error_body import error_body, error_event

if TYPE_CHECKING:
    from setpoint.proxy.gateway import Gateway

__all__ = ["ApiHandlers", "error_answer", "error_response"]

log = logging.getLogger("setpoint.proxy")

_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE_EVENT = b"data: [DONE]\n\n"


def error_response(err: SetpointError, request_id: str | None = None) -> web.Response:
    status, headers, body = error_answer(err, request_id)
    return web.Response(status=status, body=body, headers=headers)


def error_answer(err: SetpointError, request_id: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and OpenAI-shaped body of an error answer."""
    headers = {"Content-Type": _JSON, **err.headers()}
    if request_id:
        headers["x-request-id"] = request_id
    return err.status, headers, error_body(err)


class _RequestIds:
    """Time-ordered, unique ids: `req_` + ms timestamp + 64 random bits per process + a counter.

    Time order keeps the log's primary-key index append-mostly; the per-process random part keeps
    ids from different workers and replicas apart without coordination."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def __call__(self, now_s: float) -> str:
        return f"req_{int(now_s * 1000):012x}{self._prefix}{next(self._counter):06x}"


class ApiHandlers:
    def __init__(self, gw: Gateway, pipelines: dict[str, Next]) -> None:
        self._gw = gw
        self._pipelines = pipelines
        self._clock = gw.runtime.clock
        self._max_body = gw.runtime.config.server.max_body_bytes
        self._store_content = gw.runtime.config.logging.store_content
        self._new_id = _RequestIds()
        self.metrics = gw.metrics.metrics if gw.metrics is not None else None  # the edge counts its refusals here too
        self._tracer = gw.tracer
        self._overhead_header = gw.runtime.config.observability.overhead_header

    async def _complete(self, ctx: RequestContext, outputs: Callable[[], list[str]] | None = None) -> None:
        """End of every request, exactly once, before the client sees its end: settle usage and
        cost, run the stages' finalizers (budget and limit settlement), spool the record."""
        if ctx.is_recorded:
            return
        ctx.is_recorded = True
        if ctx.is_cache_hit:
            ctx.usage = Usage()  # nothing was generated upstream: free (saved_* annotations say what it saved)
            ctx.cost_micros = 0
        elif not ctx.usage.is_reported and ctx.upstream_started is not None and outputs is not None:
            fill_missing_usage(ctx, outputs())
        dep = ctx.deployment
        if dep is not None and dep.pricing is not None and not ctx.is_cache_hit:
            ctx.cost_micros = dep.pricing.cost_micros(ctx.usage)
        for fin in ctx.finalizers:
            try:
                await fin(ctx)
            except SetpointError as err:
                log.warning("request %s: finalizer failed: %s", ctx.request_id, err.message)
        latency_ms = (self._clock.monotonic() - ctx.started_mono) * 1000
        if ctx.overhead_ms is None:  # not a stream that already started: all of it is the answer's time
            ctx.overhead_ms = max(0.0, latency_ms - ctx.upstream_wait_s * 1000)
        if self._overhead_header:
            ctx.response_headers["x-setpoint-overhead-ms"] = f"{ctx.overhead_ms:.3f}"
        if self.metrics is not None:
            self.metrics.observe(ctx, latency_ms)
        if ctx.trace is not None:
            ctx.trace.finish(ctx)
        self._gw.request_log.append(ctx, latency_ms)

    # -- through aiohttp (connections the edge handed on, or the edge switched off) -----------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._via_aiohttp(request, "chat")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._via_aiohttp(request, "embeddings")

    async def _via_aiohttp(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        ex = AiohttpExchange(request)
        await self.serve(ex, endpoint)
        assert ex.response is not None
        return ex.response

    async def models(self, request: web.Request) -> web.Response:
        status, headers, body = await self.list_models(request.headers)
        return web.Response(status=status, body=body, headers=headers)

    async def model(self, request: web.Request) -> web.Response:
        status, headers, body = await self.describe_model(request.headers, request.match_info["model"])
        return web.Response(status=status, body=body, headers=headers)

    # -- whatever the server ---------------------------------------------------------------------

    async def serve(self, ex: Exchange, endpoint: str) -> None:
        """Answer one request for `endpoint` ("chat" or "embeddings") through `ex`."""
        clock = self._clock
        now = clock.now()
        ctx = RequestContext(
            request_id=self._new_id(now), endpoint=endpoint, started_at=now,
            started_mono=clock.monotonic(), headers=ex.headers, raw=b"",
        )
        if self._store_content:
            ctx.output_text = []
        if self._tracer is not None:
            ctx.trace = self._tracer.start(ctx)
        try:
            ctx.raw = await ex.read_body(self._max_body)
            reply = await self._pipelines[endpoint](ctx)
            if reply.stream is not None:
                return await self._stream(ex, ctx, reply)
            ctx.status = reply.status
            await self._complete(ctx, lambda: unary_output_text(reply.body))
            await ex.respond(
                reply.status,
                {"Content-Type": _JSON, "x-request-id": ctx.request_id, **ctx.response_headers, **reply.headers},
                reply.body,
            )
        except SetpointError as err:
            await self._fail(ex, ctx, err)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # Cancelled, or (aiohttp) the client left while its body was being read: nobody to answer.
            if not ctx.is_recorded:
                ctx.status, ctx.error_code = 499, "client_disconnected"
                await self._complete(ctx)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:  # the outermost boundary: log it, answer 500 without internals
            log.exception("unhandled error in request %s", ctx.request_id)
            await self._fail(ex, ctx, InternalError("internal error; see the gateway log for request " + ctx.request_id))

    async def _fail(self, ex: Exchange, ctx: RequestContext, err: SetpointError, relay: StreamRelay | None = None) -> None:
        """A JSON error answer (for a stream: one that failed before its first byte reached the client)."""
        if relay is None:
            ctx.status, ctx.error_code = err.status, err.wire_code
            await self._complete(ctx)
        else:
            await self._complete_stream(ctx, relay, err.status, err.wire_code)
        status, headers, body = error_answer(err, ctx.request_id)
        headers.update(ctx.response_headers)
        headers.update(err.headers())  # the error's own Retry-After wins
        await ex.respond(status, headers, body)

    async def _stream(self, ex: Exchange, ctx: RequestContext, reply: Reply) -> None:
        assert reply.stream is not None
        upstream = reply.stream
        relay = StreamRelay(ctx, self._clock)
        chunks: AsyncIterator[bytes] = aiter(upstream)
        guard = ctx.stream_guard
        try:
            # Read the first chunk before committing to a 200: a failure here is still a clean error.
            first = relay.feed(await anext(chunks))
            if guard is not None:
                await guard.on_output(ctx, relay.output_tokens)
        except StopAsyncIteration:
            await upstream.aclose()
            return await self._fail(ex, ctx, _empty_stream_error(ctx))
        except SetpointError as err:
            await upstream.aclose()
            return await self._fail(ex, ctx, err, relay)
        except BaseException:
            await upstream.aclose()
            raise
        ctx.overhead_ms = max(0.0, (self._clock.monotonic() - ctx.started_mono - ctx.upstream_wait_s) * 1000)
        if self._overhead_header:
            ctx.response_headers["x-setpoint-overhead-ms"] = f"{ctx.overhead_ms:.3f}"
        failure: SetpointError | None = None
        client_gone = False
        pending = b""  # events held for the last write
        try:
            await ex.start_stream(200, {**_SSE_HEADERS, "x-request-id": ctx.request_id, **ctx.response_headers})
            if relay.is_done:
                pending = first  # the whole stream came in the first read: it leaves with [DONE], in one write
            elif first:
                await ex.write(first)
            async for chunk in chunks:
                out = relay.feed(chunk)
                if guard is not None:
                    await guard.on_output(ctx, relay.output_tokens)  # may cut the stream here
                if out:
                    await ex.write(out)
            relay.finish()
        except SetpointError as err:
            failure = err
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            client_gone = True
            if isinstance(exc, asyncio.CancelledError):
                await upstream.aclose()
                await self._complete_stream(ctx, relay, 499, "client_disconnected")
                raise
        finally:
            await upstream.aclose()  # cancels the upstream request if it is still running
        if client_gone:
            # Billed for what was generated (counted if the upstream never sent usage).
            await self._complete_stream(ctx, relay, 499, "client_disconnected")
            return
        if failure is not None:
            await self._complete_stream(ctx, relay, failure.status, failure.wire_code)
            await ex.end(pending + error_event(failure))  # an explicit error, never a clean [DONE]
        else:
            await self._complete_stream(ctx, relay, 200, None)
            await ex.end(pending + _DONE_EVENT)

    async def _complete_stream(self, ctx: RequestContext, relay: StreamRelay, status: int, code: str | None) -> None:
        ctx.status, ctx.error_code = status, code
        ctx.stream_payloads = relay.payloads  # for the finalizers (the cache)
        if ctx.upstream_started is not None:
            ctx.upstream_ms = (self._clock.monotonic() - ctx.upstream_started) * 1000
        await self._complete(ctx, relay.generated_text)

    async def list_models(self, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        try:
            key = await self._gw.auth_stage.authenticate(headers)
        except SetpointError as err:
            return error_answer(err)
        data = [
            {"id": alias, "object": "model", "created": 0, "owned_by": "setpoint"}
            for alias in self._gw.runtime.routes
            if key.allows(alias)
        ]
        return 200, {"Content-Type": _JSON}, orjson.dumps({"object": "list", "data": data})

    async def describe_model(self, headers: Mapping[str, str], alias: str) -> tuple[int, dict[str, str], bytes]:
        try:
            key = await self._gw.auth_stage.authenticate(headers)
            if alias not in self._gw.runtime.routes or not key.allows(alias):
                raise ModelNotFoundError(f"model '{alias}' does not exist", param="model")
        except SetpointError as err:
            return error_answer(err)
        body = {"id": alias, "object": "model", "created": 0, "owned_by": "setpoint"}
        return 200, {"Content-Type": _JSON}, orjson.dumps(body)


def _empty_stream_error(ctx: RequestContext) -> SetpointError:
    name = ctx.deployment.provider.name if ctx.deployment else "upstream"
    return ProviderResponseError(f"upstream {name} ended the stream without sending anything")

"""The request edge: a small HTTP/1.1 server for the API endpoints, in front of aiohttp for the rest.

aiohttp's server costs about 50 µs of CPU per request; parsing with httptools (llhttp, the parser
uvicorn uses) and writing each answer in one send costs about 12 (measured in isolation, 16
keep-alive connections). On the hot path that is a sixth of the gateway's whole cost per request.

A connection is served here while its requests are API calls: POST chat/completions and embeddings,
GET models (with or without the /v1 prefix). At the first request for anything else (/health,
/metrics, /admin, /ui, an unknown path, another method, an upgrade), the connection is handed to
aiohttp for the rest of its life: that request and every later one is passed, re-serialised from
what was parsed (same method, target, version and headers; the body with a Content-Length), to an
aiohttp protocol on the same transport, which writes its own answers. Answers leave in request
order: a hand-over waits for the API calls queued before it.

HTTP/1.1 keep-alive, pipelining (queued, served in order, reading paused past a few), chunked and
Content-Length request bodies, `Expect: 100-continue` (ignored from HTTP/1.0 clients, as RFC 9110
says), HTTP/1.0 clients, exactly one Host in an HTTP/1.1 request, a 64 KB and 128-line cap on a
request's head (counted as bytes arrive, so a header line that never ends is refused too), the body
limit, and one timeout (`server.keepalive_timeout_s`) for a connection idle between requests, a
body that stops coming, and a head still incomplete after that long. Handlers are not cancelled
when a client leaves (aiohttp's default): a stream notices at its next write, and records a 499.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from setpoint.errors import (
    HeadersTooLargeError,
    HttpVersionNotSupportedError,
    InvalidRequestError,
    PayloadTooLargeError,
    SetpointError,
)
from setpoint.proxy.routes import error_answer

if TYPE_CHECKING:
    from setpoint.proxy.routes import ApiHandlers

__all__ = ["EdgeServer"]

log = logging.getLogger("setpoint.edge")

_API_POSTS = {
    b"/v1/chat/completions": "chat", b"/chat/completions": "chat",
    b"/v1/embeddings": "embeddings", b"/embeddings": "embeddings",
}
_MODELS = (b"/v1/models", b"/models")
_MAX_HEAD = 64 * 1024  # request line + headers
_MAX_HEADERS = 128  # header lines (aiohttp's bound too): 10k tiny ones would cost ~8 ms to parse
_MAX_QUEUED = 8  # pipelined requests parsed ahead of the one being answered
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_MAX_FORWARD_BUFFER = 256 * 1024  # bytes for aiohttp held while API calls before them are answered
_NOT_HTTP = b"\x00 unparsable\r\n\r\n"


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the request is answered `err` and the
    connection closed."""

    def __init__(self, err: SetpointError) -> None:
        super().__init__(err.message)
        self.err = err


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("_at", "_value")

    def __init__(self) -> None:
        self._at = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._at:
            self._at, self._value = now, formatdate(now, usegmt=True)
        return self._value


def _head_too_large() -> HeadersTooLargeError:
    return HeadersTooLargeError(f"the request line and headers exceed {_MAX_HEAD // 1024} KB")


def _head(status: int, headers: Mapping[str, str], framing: str, date: str) -> bytes:
    out = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    for name, value in headers.items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            log.warning("dropped response header %r: it contains a line break", name)
            continue
        out.append(f"{name}: {value}\r\n")
    out.append(f"{framing}Date: {date}\r\n\r\n")
    return "".join(out).encode("utf-8")


class EdgeServer:
    """Listens, serves API calls itself, and hands other connections to `fallback` (aiohttp's
    protocol factory, `web.Server`)."""

    def __init__(
        self, api: ApiHandlers, fallback: Callable[[], asyncio.Protocol], *, max_body: int,
        keepalive_timeout_s: float = 75.0,
    ) -> None:
        self.api = api
        self.metrics = api.metrics  # refusals are counted here: they never become requests
        self.fallback = fallback
        self.max_body = max_body
        self.keepalive_timeout_s = keepalive_timeout_s
        self.date = _Date()
        self.connections: set[_Connection] = set()
        self.is_closing = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_port=reuse_port or None, backlog=backlog
        )
        self._sweeper = asyncio.create_task(self._close_idle())
        return int(self._server.sockets[0].getsockname()[1])

    async def _close_idle(self) -> None:
        """Close connections that have kept the keep-alive timeout waiting: idle between requests,
        silent in the middle of a request body, or still sending one head after that long (a
        head trickled a byte at a time keeps the connection active, never complete)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(10.0, self.keepalive_timeout_s / 4)))
            cutoff = loop.time() - self.keepalive_timeout_s
            for conn in list(self.connections):
                if conn.is_stalled(cutoff):
                    conn.close()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop listening; let answers under way finish (up to `timeout_s`), then close every
        connection this edge still serves. Connections handed to aiohttp are closed by aiohttp."""
        self.is_closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.is_idle:
                conn.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            await conn.abort()


class _Connection(asyncio.Protocol):
    """One client connection (also the httptools parser's callback object)."""

    def __init__(self, edge: EdgeServer) -> None:
        self._edge = edge
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: collections.deque[_Request] = collections.deque()  # the head is being answered
        self._parsing: _Request | None = None  # headers complete, body still arriving
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._in_head = False  # between a request's first byte and the end of its head
        self._head_started = 0.0
        self._head_fed = 0  # bytes fed to the parser inside one head, after the read it began in
        self._began = False  # a request began in the read being parsed
        self._in_message = False  # between a request's first byte and its end
        self._forward: list[bytes] | None = None  # handed over: bytes for aiohttp, re-serialised from the parser
        self._forward_chunked = False  # the request being passed on has a chunked body
        self._fallback: asyncio.Protocol | None = None
        self._is_raw = False  # aiohttp has the connection and the parser is between requests: bytes pass as they are
        self._is_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._broken: SetpointError | None = None  # a request that could not be parsed: answered in turn
        self.is_closed = False
        self.last_active = self._loop.time()

    # -- asyncio -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCP transport is not a subclass
        self._edge.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._is_raw:
            assert self._forward is not None
            self._forward.append(data)
            self._flush_forward()
            return
        if self._broken is not None:
            return
        self.last_active = self._loop.time()
        self._began = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:  # the upgraded request was passed on: the rest is aiohttp's
            self._is_raw = True
            assert self._forward is not None
            self._forward.append(data[upgrade.args[0]:])
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Refused):
                raise
            self._fail(exc.__context__.err)
        except httptools.HttpParserError as exc:
            self._fail(InvalidRequestError(f"malformed HTTP request: {exc}"))
        else:
            if self._in_head and not self._began:
                # httptools holds a header line that has not ended yet in its own buffer, out of
                # the callbacks' sight: count what is fed while a head is open instead.
                self._head_fed += len(data)
                if self._head_fed > _MAX_HEAD:
                    self._fail(_head_too_large())
        if self._forward is not None:
            self._flush_forward()

    def eof_received(self) -> bool | None:
        if self._fallback is not None:
            return self._fallback.eof_received()
        return None  # close our side too; answers under way are dropped (the client left)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self._edge.connections.discard(self)
        for req in self._queue:
            req.client_left()
        if self._parsing is not None:
            self._parsing.client_left()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._fallback is not None:
            self._fallback.connection_lost(exc)

    def pause_writing(self) -> None:
        self._is_paused = True
        if self._fallback is not None:
            self._fallback.pause_writing()

    def resume_writing(self) -> None:
        self._is_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._fallback is not None:
            self._fallback.resume_writing()

    # -- httptools -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self._in_head = True
        self._began = True
        self._head_started = self.last_active  # the read this head began in
        self._head_fed = 0
        self._url = b""
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(self._headers) > _MAX_HEADERS:
            raise _Refused(HeadersTooLargeError(f"a request may have at most {_MAX_HEADERS} header lines"))
        self._grow(len(name) + len(value) + 4)

    def _grow(self, n: int) -> None:
        self._head_size += n
        if self._head_size > _MAX_HEAD:
            raise _Refused(_head_too_large())

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        if self._forward is not None or parser.should_upgrade():
            self._forward_head()
            return
        method = parser.get_method()
        path = self._url.partition(b"?")[0]
        route: str | None = None
        model: str | None = None
        if method == b"POST":
            route = _API_POSTS.get(path)
        elif method == b"GET":
            if path in _MODELS:
                route = "models"
            else:
                for prefix in _MODELS:
                    if path.startswith(prefix + b"/") and path.find(b"/", len(prefix) + 1) < 0:
                        route, model = "model", unquote(path[len(prefix) + 1:].decode("utf-8", "replace"))
                        break
        if route is None or not model and route == "model":
            self._forward_head()
            return
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Refused(HttpVersionNotSupportedError(f"HTTP/{version} is not supported here; use HTTP/1.1"))
        headers = CIMultiDictProxy(CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self._headers]
        ))
        if version == "1.1" and len(headers.getall("host", ())) != 1:  # RFC 9112 3.2, as aiohttp
            raise _Refused(InvalidRequestError("an HTTP/1.1 request needs exactly one Host header"))
        req = _Request(self, route, model, headers, parser.should_keep_alive(), version)
        self._parsing = req
        self._queue.append(req)
        if len(self._queue) == 1:
            req.start()
        elif len(self._queue) > _MAX_QUEUED and self._transport is not None:
            self._transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None:
            req.add_body(body)
        elif self._forward is not None:
            self._forward.append(b"%x\r\n%b\r\n" % (len(body), body) if self._forward_chunked else body)

    def on_message_complete(self) -> None:
        self._in_message = False
        req = self._parsing
        if req is not None:
            self._parsing = None
            req.body_complete()
        elif self._forward is not None and self._forward_chunked:
            self._forward.append(b"0\r\n\r\n")

    # -- hand-over to aiohttp ------------------------------------------------------------------

    def _forward_head(self) -> None:
        """Pass this request on to aiohttp: its head now (so aiohttp answers `Expect`, refuses a
        body too large, or answers before the body ends, as it would on its own), its body as it
        arrives, in the framing the client chose (a chunked body is re-chunked as it is decoded)."""
        if self._forward is None:
            self._forward = []
        parser = self._parser
        head = [parser.get_method() + b" " + self._url + b" HTTP/" + parser.get_http_version().encode() + b"\r\n"]
        chunked = False
        for name, value in self._headers:
            if name.lower() == b"transfer-encoding" and value.lower().find(b"chunked") >= 0:
                chunked = True
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        self._forward_chunked = chunked
        self._forward.append(b"".join(head))

    def _flush_forward(self) -> None:
        """Pass the bytes for aiohttp on once every API call before them is answered."""
        if self._forward is None or self._transport is None or self.is_closed:
            return
        if self._queue:  # answers go out in request order: wait, and stop reading past a bound
            if sum(map(len, self._forward)) > _MAX_FORWARD_BUFFER:
                self._transport.pause_reading()
            return
        if self._fallback is None:
            self._edge.connections.discard(self)  # aiohttp's from now on (and closed by it at shutdown)
            self._fallback = self._edge.fallback()
            self._fallback.connection_made(self._transport)
            if self._is_paused:
                self._fallback.pause_writing()
            self._transport.resume_reading()
        if self._forward:
            data = b"".join(self._forward)
            self._forward.clear()
            self._fallback.data_received(data)
        if self._broken is not None:
            self._forward = []  # nothing more is read from this connection
            self._fallback.data_received(_NOT_HTTP)
            self._broken = None
            self._is_raw = True  # and whatever aiohttp does now, it does alone
        elif not self._in_message:
            self._is_raw = True  # between requests: no need to parse anything any more

    # -- answering -----------------------------------------------------------------------------

    def _fail(self, err: SetpointError) -> None:
        """The bytes cannot be parsed: answer after what is queued, then close."""
        self._broken = err
        if self._forward is not None:
            # aiohttp has (or will have) this connection: after what it was passed, it gets bytes it
            # cannot parse either (in a read of their own, as they would have come), and answers
            # them (400) and closes, after its answers under way.
            return
        req = self._parsing
        if req is not None:
            # Its handler may already be waiting for the body: it gets the error from read_body,
            # answers it (and records it) in turn, and the connection closes after it.
            self._parsing = None
            req.body_failed(err)
            return
        if not self._queue:
            self._answer_broken()

    def _answer_broken(self) -> None:
        assert self._broken is not None and self._transport is not None
        status, headers, body = error_answer(self._broken)
        if self._edge.metrics is not None:
            self._edge.metrics.refused(status, self._broken.wire_code)
        self.send(_head(status, headers, f"Content-Length: {len(body)}\r\nConnection: close\r\n", self._edge.date()) + body)
        self.close()

    def send(self, data: bytes) -> None:
        if not self.is_closed and self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        if self.is_closed:
            raise ConnectionResetError("the client closed the connection")
        if self._is_paused:
            self._drain = self._loop.create_future()
            await self._drain
            self._drain = None
            if self.is_closed:
                raise ConnectionResetError("the client closed the connection")

    def finished(self, req: _Request) -> None:
        """`req` is answered: close, or go on with the next queued request / the hand-over."""
        self._queue.popleft()
        self.last_active = self._loop.time()
        if self.is_closed:
            return
        if not req.keep_alive or not req.is_complete:
            self.close()
            return
        if self._queue:
            self._queue[0].start()
            if len(self._queue) <= _MAX_QUEUED and self._transport is not None:
                self._transport.resume_reading()
        elif self._forward is not None:
            self._flush_forward()
        elif self._broken is not None:
            self._answer_broken()
        elif self._edge.is_closing:
            self.close()

    @property
    def is_idle(self) -> bool:
        return not self._queue and self._fallback is None

    def is_stalled(self, cutoff: float) -> bool:
        """Nothing came since `cutoff` while idle or inside a request's body, or the head being
        read began before it."""
        if self._fallback is not None:
            return False  # aiohttp's
        if self._in_head:
            return self._head_started < cutoff
        return self.last_active < cutoff and (not self._queue or self._parsing is not None)

    def close(self) -> None:
        if self._transport is not None and not self.is_closed:
            self._transport.close()

    async def abort(self) -> None:
        """Shutdown after the grace period: stop what is still running and drop the connection."""
        for req in list(self._queue):
            await req.cancel()
        if self._transport is not None:
            self._transport.abort()


class _Request:
    """One API call on the edge: parsed headers, the body as it arrives, and the `Exchange` the
    handlers answer through."""

    __slots__ = (
        "_body", "_conn", "_error", "_expects_continue", "_head", "_is_http11", "_size", "_task", "_too_large",
        "_waiter", "headers", "is_complete", "keep_alive", "model", "route",
    )

    def __init__(
        self, conn: _Connection, route: str, model: str | None, headers: CIMultiDictProxy[str],
        keep_alive: bool, version: str,
    ) -> None:
        self._conn = conn
        self.route = route
        self.model = model
        self.headers = headers
        self.keep_alive = keep_alive and not conn._edge.is_closing
        self._is_http11 = version == "1.1"  # an HTTP/1.0 client gets a stream that ends when we close
        # RFC 9110 10.1.1: the expectation of an HTTP/1.0 request is ignored
        self._expects_continue = self._is_http11 and headers.get("expect", "").lower() == "100-continue"
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._error: SetpointError | None = None  # the body could not be parsed
        self.is_complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._head = b""  # a stream's head, sent with its first bytes

    # -- fed by the connection -----------------------------------------------------------------

    def add_body(self, data: bytes) -> None:
        if self._too_large:
            return
        self._size += len(data)
        if self._size > self._conn._edge.max_body:
            self._too_large = True
            self._body.clear()
            self._wake()
            return
        self._body.append(data)

    def body_complete(self) -> None:
        self.is_complete = True
        self._wake()

    def body_failed(self, err: SetpointError) -> None:
        self._error = err
        self.keep_alive = False
        self._wake()

    def client_left(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()  # the handler records a 499

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def start(self) -> None:
        self._task = self._conn._loop.create_task(self._run())

    async def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        conn, api = self._conn, self._conn._edge.api
        try:
            if self.route == "models":
                await self.respond(*await api.list_models(self.headers))
            elif self.route == "model":
                assert self.model is not None
                await self.respond(*await api.describe_model(self.headers, self.model))
            else:
                await api.serve(self, self.route)
        except asyncio.CancelledError:
            self.keep_alive = False
        except Exception:
            log.exception("edge: unhandled error answering %s", self.route)
            self.keep_alive = False
        finally:
            conn.finished(self)

    # -- the Exchange --------------------------------------------------------------------------

    async def read_body(self, limit: int) -> bytes:
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.keep_alive = False  # the body is not read: the connection cannot be reused
            raise PayloadTooLargeError(f"request body is {length} bytes; the limit is {limit}")
        if not self.is_complete and not self._too_large and self._error is None:
            if self._conn.is_closed:
                raise asyncio.CancelledError
            if self._expects_continue:
                self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                while not self.is_complete and not self._too_large and self._error is None:
                    await self._waiter
                    self._waiter = asyncio.get_running_loop().create_future()
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        if self._too_large or self._size > limit:
            self.keep_alive = False
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        return body

    def _framing(self, extra: str) -> str:
        if not self.keep_alive:
            return extra + "Connection: close\r\n"
        return extra if self._is_http11 else extra + "Connection: keep-alive\r\n"  # HTTP/1.0 asked for it

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        if not self.is_complete:
            self.keep_alive = False
        head = _head(status, headers, self._framing(f"Content-Length: {len(body)}\r\n"), self._conn._edge.date())
        self._conn.send(head + body)

    async def start_stream(self, status: int, headers: Mapping[str, str]) -> None:
        if not self._is_http11:
            self.keep_alive = False
        framing = self._framing("Transfer-Encoding: chunked\r\n" if self._is_http11 else "")
        self._head = _head(status, headers, framing, self._conn._edge.date())

    def _frame(self, data: bytes) -> bytes:
        if not self._is_http11 or not data:
            return data
        return b"%x\r\n%b\r\n" % (len(data), data)

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn.is_closed:
            raise ConnectionResetError("the client closed the connection")
        head, self._head = self._head, b""
        conn.send(head + self._frame(data))
        await conn.drain()

    async def end(self, data: bytes) -> None:
        head, self._head = self._head, b""
        conn = self._conn
        conn.send(head + self._frame(data) + (b"0\r\n\r\n" if self._is_http11 else b""))

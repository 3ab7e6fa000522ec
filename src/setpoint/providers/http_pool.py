"""A lean HTTP/1.1 client for the request path: keep-alive connections per origin, httptools
(llhttp, the parser uvicorn uses) for the responses, asyncio protocols for the bytes.

Why not aiohttp's or another library's client: on this path the client is the largest cost after
the server. Against the nginx mock, 16 concurrent requests, CPU per request of the whole process:
aiohttp 73-80 µs, pyreqwest 41-45 µs (half of it on its own runtime thread), aiosonic 177 µs, this
pool 10-20 µs (docs/benchmarks.md). It does only what an upstream call needs: one request written
in one send, a response parsed as it arrives (Content-Length, chunked or close-delimited bodies),
chunks handed over as they come with backpressure, a connect timeout and a total deadline, TLS
through the standard `ssl` module, and a connection cap per origin. A connection goes back to the
pool only after a complete, keep-alive response; anything else closes it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

__all__ = [
    "BodyError",
    "BodyTooLargeError",
    "ConnectError",
    "HttpPool",
    "PooledResponse",
    "ProtocolError",
    "TransportError",
    "TransportTimeout",
    "encode_headers",
]

_HIGH_WATER = 256 * 1024  # pause reading when this much body is waiting for the consumer
_LOW_WATER = 64 * 1024
_MAX_HEAD = 64 * 1024  # status line and headers; more is an upstream gone wrong, not an answer


class TransportError(Exception):
    """Base of the pool's failures; adapters map these into the error tree."""


class ConnectError(TransportError):
    """No connection could be made (refused, unreachable, DNS, TLS handshake), or it was lost
    before the status line."""


class TransportTimeout(TransportError):
    """The connect timeout or the total deadline passed."""


class ProtocolError(TransportError):
    """The upstream's bytes are not valid HTTP/1.1."""


class BodyError(TransportError):
    """The connection ended inside the body (truncated)."""


class BodyTooLargeError(TransportError):
    """The body is longer than the reader's limit (the connection is dropped, not drained)."""


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """A header block, encoded once per adapter; refuses CR/LF (header injection) at startup."""
    lines: dict[str, bytes] = {}  # by lower-case name: a later header replaces an earlier one
    for name, value in headers.items():
        if not name or any(c in name for c in "\r\n: ") or "\r" in value or "\n" in value:
            raise ValueError(f"invalid HTTP header {name!r}")
        if name.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            continue  # the pool writes these itself
        lines[name.lower()] = f"{name}: {value}\r\n".encode("latin-1")
    return b"".join(lines.values())


class _Origin:
    __slots__ = ("host", "host_header", "idle", "port", "sem", "ssl")

    def __init__(self, scheme: str, host: str, port: int, ssl_ctx: ssl.SSLContext | None, limit: int) -> None:
        self.host = host
        self.port = port
        self.ssl = ssl_ctx if scheme == "https" else None
        default = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        self.host_header = (name if port == default else f"{name}:{port}").encode("idna")
        self.idle: collections.deque[tuple[_Conn, float]] = collections.deque()
        self.sem = asyncio.Semaphore(limit)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    __slots__ = (
        "_bytes_in", "_chunks", "_paused", "_waiter", "buffered", "closed", "complete", "error",
        "has_length", "headers", "keep_alive", "parser", "status", "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._bytes_in = 0
        self._paused = False
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.has_length = False
        self.error: TransportError | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP response: {exc}"))
        else:
            if self.status == 0 and self._bytes_in > _MAX_HEAD:
                self._fail(ProtocolError(f"the response head is over {_MAX_HEAD // 1024} KB"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete or self.error is not None:
            self._wake()
            return
        if self.status >= 200 and not self.has_length:
            self.complete = True  # a close-delimited body ends with the connection
            self.keep_alive = False
            self._wake()
        elif self.status >= 200:
            self._fail(BodyError("the connection closed inside the body"))
        elif self._bytes_in:
            self._fail(ProtocolError("the connection closed inside the response head"))
        else:
            self._fail(ConnectError("the connection closed before a response"))

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        prev = self.headers.get(key)
        self.headers[key] = text if prev is None else f"{prev}, {text}"

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.headers = {}  # an informational answer: the real one follows
            return
        self.status = status
        h = self.headers
        self.has_length = "content-length" in h or "chunked" in h.get("transfer-encoding", "").lower() or status in (204, 304)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- used by the pool and the response -------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def deadline_passed(self) -> None:
        if not self.complete:  # a response already read in full is not late
            self._fail(TransportTimeout("timed out"))

    def _fail(self, err: TransportError) -> None:
        if self.error is None:
            self.error = err
        self.abort()
        self._wake()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take_chunk(self) -> bytes | None:
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        if self._paused and self.buffered < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk


class PooledResponse:
    """Status and headers are here; the body is read whole (`read`) or as it comes (`chunks`).
    Call `release` when done: a finished keep-alive connection goes back to the pool, any other
    is closed (an unfinished stream stops the upstream)."""

    __slots__ = ("_conn", "_origin", "_pool", "_timer", "headers", "status")

    def __init__(self, pool: HttpPool, origin: _Origin, conn: _Conn, timer: asyncio.TimerHandle) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self._timer = timer
        self.status = conn.status
        self.headers: Mapping[str, str] = conn.headers  # lower-case names

    @property
    def is_finished(self) -> bool:
        conn = self._conn
        return conn is None or (conn.complete and not conn._chunks)

    async def read(self, limit: int | None = None, *, truncate: bool = False) -> bytes:
        """The whole body. Past `limit` bytes: raise BodyTooLargeError, or with `truncate` return
        the first `limit` bytes; either way the connection is dropped rather than drained."""
        if limit is not None and not truncate:
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                self.release()
                raise BodyTooLargeError(f"a body of {declared} bytes (the limit is {limit})")
        parts: list[bytes] = []
        size = 0
        body = self.chunks()
        try:
            async for chunk in body:
                parts.append(chunk)
                size += len(chunk)
                if limit is not None and size > limit:
                    self.release()  # unfinished: the connection is closed
                    if truncate:
                        return b"".join(parts)[:limit]
                    raise BodyTooLargeError(f"a body over {limit} bytes")
        finally:
            await body.aclose()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                chunk = conn.take_chunk()
                if chunk is not None:
                    yield chunk
                    continue
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    break
                await conn.wait()
        finally:
            self.release()  # at the end, on an error, on cancellation or when the consumer stops

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._timer.cancel()
        self._pool._active.discard(conn)
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None and not conn._chunks:
            conn._reset()
            self._origin.idle.append((conn, time.monotonic()))
        else:
            conn.abort()
        self._origin.sem.release()


class HttpPool:
    def __init__(
        self,
        *,
        max_connections: int,
        connect_timeout_s: float,
        total_timeout_s: float,
        idle_timeout_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._total_timeout_s = total_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._ssl = ssl_context
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._urls: dict[str, tuple[_Origin, bytes]] = {}
        self._active: set[_Conn] = set()  # connections serving a response: closed by `aclose`
        self._closed = False

    def _target(self, url: str) -> tuple[_Origin, bytes]:
        hit = self._urls.get(url)
        if hit is not None:
            return hit
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"unsupported URL scheme or host: {scheme!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        key = (scheme, parts.hostname, port)
        origin = self._origins.get(key)
        if origin is None:
            ctx = self._ssl
            if scheme == "https" and ctx is None:
                ctx = self._ssl = ssl.create_default_context()
            origin = self._origins[key] = _Origin(scheme, parts.hostname, port, ctx, self._limit)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        hit = (origin, path.encode("ascii"))
        if len(self._urls) < 1024:
            self._urls[url] = hit
        return hit

    async def _connect(self, origin: _Origin, *, reuse: bool) -> tuple[_Conn, bool]:
        """A connection, and whether it is a reused one."""
        now = time.monotonic()
        while reuse and origin.idle:
            conn, since = origin.idle.pop()
            if not conn.closed and now - since < self._idle_timeout_s:
                return conn, True
            conn.abort()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Conn, origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                ),
                self._connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise TransportTimeout("connect timed out") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectError(exc.strerror or type(exc).__name__) from None
        return conn, False

    async def post(self, url: str, header_block: bytes, body: bytes) -> PooledResponse:
        """Send one POST; returns once the status line and headers are in.

        One retry, on a new connection, in exactly one case: a reused keep-alive connection that the
        upstream closed without sending a byte (it closed the idle connection as we reused it, so it
        never read the request). Every other failure is the caller's to retry or not."""
        if self._closed:
            raise ConnectError("the client is closed")
        origin, path = self._target(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._total_timeout_s  # the wait for a free slot counts too
        if origin.sem.locked():
            try:
                await asyncio.wait_for(origin.sem.acquire(), self._total_timeout_s)
            except asyncio.TimeoutError:
                raise TransportTimeout("timed out waiting for a free connection") from None
        else:
            await origin.sem.acquire()
        conn: _Conn | None = None
        timer: asyncio.TimerHandle | None = None
        request = b"POST %s HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n%s" % (
            path, origin.host_header, header_block, len(body), body)
        try:
            for reuse in (True, False):
                if self._closed:  # closed while this call waited for a slot or a connection
                    raise ConnectError("the client is closed")
                conn, reused = await self._connect(origin, reuse=reuse)
                if self._closed:
                    raise ConnectError("the client is closed")
                if loop.time() >= deadline:
                    raise TransportTimeout("timed out")
                self._active.add(conn)
                timer = loop.call_at(deadline, conn.deadline_passed)
                assert conn.transport is not None
                conn.transport.write(request)
                while conn.status == 0 and conn.error is None:
                    await conn.wait()
                err = conn.error
                if err is None:
                    break
                if reused and conn._bytes_in == 0 and isinstance(err, ConnectError):
                    timer.cancel()
                    self._active.discard(conn)
                    conn.abort()
                    conn = timer = None
                    continue
                raise err
        except BaseException:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                self._active.discard(conn)
                conn.abort()
            origin.sem.release()
            raise
        assert timer is not None and conn is not None
        return PooledResponse(self, origin, conn, timer)

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._active:
            conn.abort()
        self._active.clear()
        for origin in self._origins.values():
            while origin.idle:
                conn, _ = origin.idle.pop()
                if conn.transport is not None:
                    conn.transport.close()
        self._origins.clear()
        self._urls.clear()
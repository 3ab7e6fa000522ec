"""The pooled HTTP/1.1 client (`http_pool`) against real upstreams on loopback.

Every test starts an `Upstream`: an asyncio server on 127.0.0.1 that records each request it
receives (raw bytes, which TCP connection) and answers with scripted raw bytes, so the tests control
exactly what goes on the wire. No mocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from setpoint.errors import ProviderResponseError
from setpoint.providers.http_pool import (
    BodyError,
    BodyTooLargeError,
    ConnectError,
    HttpPool,
    PooledResponse,
    ProtocolError,
    TransportError,
    TransportTimeout,
    encode_headers,
)
from setpoint.providers.http_session import map_transport_errors

pytestmark = pytest.mark.timeout(20)


# -- the scripted upstream ----------------------------------------------------------------------


@dataclass
class Request:
    conn: int  # index of the TCP connection it arrived on: 0, 1, ... in accept order
    raw: bytes  # head and body exactly as received
    body: bytes


Reply = bytes | Callable[[Request, asyncio.StreamWriter], Awaitable[None]]

SILENT = b""  # a reply that answers nothing: the upstream just waits for the next request or EOF


class Upstream:
    """Answers the n-th request with `replies[n]` (the last one repeats): raw bytes written as they
    are, or an async callable given the request and the writer. After a reply the connection goes on
    reading, so a client that closes is seen as EOF (`eof` holds those connection indexes)."""

    def __init__(self, replies: Sequence[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[Request] = []
        self.connections = 0  # accepted so far
        self.open = 0
        self.max_open = 0  # most connections open at once
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at once
        self.eof: set[int] = set()  # connections the client closed (EOF or reset)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        cid = self.connections
        self.connections += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while not writer.is_closing():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    body = await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    self.eof.add(cid)
                    return
                req = Request(cid, head + body, body)
                self.requests.append(req)
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    if callable(reply):
                        await reply(req, writer)
                    elif reply:
                        writer.write(reply)
                        await writer.drain()
                except ConnectionError:
                    self.eof.add(cid)
                    return
                finally:
                    self.in_flight -= 1
        finally:
            self.open -= 1
            writer.close()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        await self._server.wait_closed()


def response(body: bytes = b"ok", status: str = "200 OK", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A complete Content-Length response."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def slowly(*pieces: bytes, delay: float = 0.01, close: bool = False) -> Reply:
    """A reply written in separate sends with a pause between them; `close` ends the connection."""

    async def reply(req: Request, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(delay)
        if close:
            writer.close()

    return reply


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(*replies: Reply) -> Upstream:
        up = await Upstream(replies).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.aclose()


@pytest.fixture
async def make_pool() -> AsyncIterator[Callable[..., HttpPool]]:
    pools: list[HttpPool] = []

    def make(**options: float) -> HttpPool:
        pool = HttpPool(**{"max_connections": 4, "connect_timeout_s": 2.0, "total_timeout_s": 5.0, **options})  # type: ignore[arg-type]
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()
    await asyncio.sleep(0.01)  # let aborted transports run connection_lost (no unclosed sockets)


# -- request framing ----------------------------------------------------------------------------


async def test_request_is_framed_exactly(upstream, make_pool) -> None:
    up = await upstream(response(b"{}"))
    pool = make_pool()
    block = encode_headers({"Authorization": "Bearer sk-1", "Content-Type": "application/json"})
    resp = await pool.post(up.url("/path?q=1"), block, b'{"a": 1}')
    assert await resp.read() == b"{}"
    assert up.requests[0].raw == (
        b"POST /path?q=1 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Authorization: Bearer sk-1\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 8\r\n"
        b"\r\n"
        b'{"a": 1}' % up.port
    )


async def test_empty_path_and_body(upstream, make_pool) -> None:
    up = await upstream(response(b""))
    pool = make_pool()
    resp = await pool.post(up.url(""), b"", b"")
    assert await resp.read() == b""
    assert up.requests[0].raw == b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 0\r\n\r\n" % up.port


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://example.com/x", b"example.com"),
        ("http://example.com:80/x", b"example.com"),
        ("http://example.com:8080/x", b"example.com:8080"),
        ("https://example.com/x", b"example.com"),
        ("https://example.com:8443/x", b"example.com:8443"),
        ("http://[::1]:81/x", b"[::1]:81"),
    ],
)
async def test_host_header_has_port_only_when_not_default(make_pool, url: str, host: bytes) -> None:
    origin, path = make_pool()._target(url)  # white-box: no upstream listens on port 80 here
    assert origin.host_header == host
    assert path == b"/x"


# -- response bodies ----------------------------------------------------------------------------


async def test_content_length_body_status_and_headers(upstream, make_pool) -> None:
    head = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Multi: a\r\nx-multi: b\r\nContent-Length: 11\r\n\r\n"
    up = await upstream(slowly(head + b'{"ok"', b":true}"))  # the body arrives in two sends
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    assert resp.status == 201
    assert dict(resp.headers) == {"content-type": "application/json", "x-multi": "a, b", "content-length": "11"}
    assert await resp.read() == b'{"ok":true}'
    assert resp.is_finished


async def test_chunked_body_is_streamed_chunk_by_chunk(upstream, make_pool) -> None:
    go = [asyncio.Event(), asyncio.Event()]

    async def reply(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"alpha"))
        await go[0].wait()  # sent only once the client has handed "alpha" over
        await asyncio.sleep(0.01)
        writer.write(chunk(b"beta"))
        await go[1].wait()
        await asyncio.sleep(0.01)
        writer.write(chunk(b"gamma") + LAST_CHUNK)

    up = await upstream(reply)
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    got: list[bytes] = []
    async with asyncio.timeout(3):  # a client that waits for the whole body never gets here
        async for piece in resp.chunks():
            got.append(piece)
            if len(got) <= len(go):
                go[len(got) - 1].set()
    assert got == [b"alpha", b"beta", b"gamma"]


async def test_close_delimited_body_is_read_whole_and_connection_not_reused(upstream, make_pool) -> None:
    up = await upstream(
        slowly(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ", b"second part", close=True),
        response(b"next"),
    )
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    assert await resp.read() == b"first part, second part"
    resp = await pool.post(up.url(), b"", b"")
    assert await resp.read() == b"next"
    assert [r.conn for r in up.requests] == [0, 1]


# -- keep-alive ---------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection_until_connection_close(upstream, make_pool) -> None:
    up = await upstream(response(b"one"), response(b"two", headers=[("Connection", "close")]), response(b"three"))
    pool = make_pool()
    bodies = [await (await pool.post(up.url(), b"", b"")).read() for _ in range(3)]
    assert bodies == [b"one", b"two", b"three"]
    assert [r.conn for r in up.requests] == [0, 0, 1]
    await eventually(lambda: 0 in up.eof)  # the client closed the connection it was told to close


async def test_idle_connection_closed_by_upstream_is_not_reused(upstream, make_pool) -> None:
    async def answer_then_close(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(response(b"one"))
        await writer.drain()
        writer.close()  # a keep-alive response, then the upstream drops the idle connection

    up = await upstream(answer_then_close, response(b"two"))
    pool = make_pool()
    assert await (await pool.post(up.url(), b"", b"")).read() == b"one"
    await asyncio.sleep(0.05)
    assert await (await pool.post(up.url(), b"", b"")).read() == b"two"
    assert [r.conn for r in up.requests] == [0, 1]


async def test_idle_timeout_drops_old_connection(upstream, make_pool) -> None:
    up = await upstream(response(b"a"))
    pool = make_pool(idle_timeout_s=0.05)
    for _ in range(2):
        assert await (await pool.post(up.url(), b"", b"")).read() == b"a"
        await asyncio.sleep(0.1)
    assert [r.conn for r in up.requests] == [0, 1]
    await eventually(lambda: 0 in up.eof)


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "truncated",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
        CHUNKED_HEAD + chunk(b"0123456789") + b"a\r\n01",
    ],
    ids=["content-length", "chunked"],
)
async def test_truncated_body_raises_body_error(upstream, make_pool, truncated: bytes) -> None:
    up = await upstream(slowly(truncated, close=True))
    resp = await make_pool().post(up.url(), b"", b"")
    assert resp.status == 200
    with pytest.raises(BodyError):
        await resp.read()


async def test_truncated_body_maps_to_provider_response_error(upstream, make_pool) -> None:
    up = await upstream(slowly(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", close=True))
    resp = await make_pool().post(up.url(), b"", b"")
    with pytest.raises(ProviderResponseError, match="upstream p ") as info, map_transport_errors("p"):
        await resp.read()
    assert isinstance(info.value.__cause__, BodyError)


async def test_garbage_instead_of_http_raises_protocol_error(upstream, make_pool) -> None:
    up = await upstream(b"hello\r\n\r\n")
    with pytest.raises(ProtocolError):
        await make_pool().post(up.url(), b"", b"")


async def test_close_inside_response_head_raises_protocol_error(upstream, make_pool) -> None:
    up = await upstream(slowly(b"HTTP/1.1 200 OK\r\nContent-", close=True))
    with pytest.raises(ProtocolError):
        await make_pool().post(up.url(), b"", b"")


async def test_endless_response_head_is_a_protocol_error(upstream, make_pool) -> None:
    async def endless(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(2_000):  # 2,000 headers of ~100 bytes: far past the 64 KB cap
            writer.write(b"x-filler-%d: %s\r\n" % (i, b"y" * 80))
            await writer.drain()
        await asyncio.sleep(5)

    up = await upstream(endless)
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="over 64 KB"):
        await make_pool().post(up.url(), b"", b"")
    assert time.monotonic() - start < 2


async def test_close_without_answer_raises_connect_error(upstream, make_pool) -> None:
    up = await upstream(slowly(close=True))
    with pytest.raises(ConnectError):
        await make_pool().post(up.url(), b"", b"")
    assert len(up.requests) == 1


async def test_reused_connection_closed_without_a_byte_is_retried_once_on_a_new_one(upstream, make_pool) -> None:
    # Request 2 arrives on the kept-alive connection and the upstream closes it without answering,
    # as a server does when its idle timeout fires just as the connection is reused.
    up = await upstream(response(b"first"), slowly(close=True), response(b"third"))
    pool = make_pool()
    assert await (await pool.post(up.url(), b"", b"a")).read() == b"first"
    resp = await pool.post(up.url(), b"", b"b")
    assert await resp.read() == b"third"
    assert [r.conn for r in up.requests] == [0, 0, 1]  # the retry went out on a new connection
    assert [r.body for r in up.requests] == [b"a", b"b", b"b"]


async def test_reused_connection_failing_after_bytes_is_not_retried(upstream, make_pool) -> None:
    up = await upstream(response(b"first"), slowly(b"HTTP/1.1 200 OK\r\n", close=True), response(b"never"))
    pool = make_pool()
    assert await (await pool.post(up.url(), b"", b"")).read() == b"first"
    with pytest.raises(ProtocolError):
        await pool.post(up.url(), b"", b"")
    assert len(up.requests) == 2


async def test_retry_on_a_new_connection_is_not_retried_again(upstream, make_pool) -> None:
    up = await upstream(response(b"first"), slowly(close=True))  # every later request: closed unanswered
    pool = make_pool()
    assert await (await pool.post(up.url(), b"", b"")).read() == b"first"
    with pytest.raises(ConnectError):
        await pool.post(up.url(), b"", b"")
    assert [r.conn for r in up.requests] == [0, 0, 1]


async def test_connection_refused_raises_connect_error(make_pool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: connecting is refused
        port = sock.getsockname()[1]
        with pytest.raises(ConnectError):
            await make_pool().post(f"http://127.0.0.1:{port}/", b"", b"")


async def test_post_after_aclose_raises_connect_error(make_pool) -> None:
    pool = make_pool()
    await pool.aclose()
    with pytest.raises(ConnectError, match="closed"):
        await pool.post("http://127.0.0.1:9/", b"", b"")


# -- deadlines ----------------------------------------------------------------------------------


async def test_total_deadline_without_answer(upstream, make_pool) -> None:
    up = await upstream(SILENT)
    pool = make_pool(total_timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(TransportTimeout):
        await pool.post(up.url(), b"", b"")
    assert 0.15 <= time.monotonic() - start < 0.6
    await eventually(lambda: 0 in up.eof)  # the timed-out connection is closed


async def test_total_deadline_when_stream_stalls(upstream, make_pool) -> None:
    up = await upstream(CHUNKED_HEAD + chunk(b"first"))  # then nothing more
    pool = make_pool(total_timeout_s=0.3)
    start = time.monotonic()
    resp = await pool.post(up.url(), b"", b"")
    stream = resp.chunks()
    assert await anext(stream) == b"first"
    with pytest.raises(TransportTimeout):
        await anext(stream)
    assert 0.25 <= time.monotonic() - start < 0.8


async def test_complete_response_read_after_deadline_is_not_a_timeout(upstream, make_pool) -> None:
    up = await upstream(response(b"all here"))
    pool = make_pool(total_timeout_s=0.1)
    resp = await pool.post(up.url(), b"", b"")
    await asyncio.sleep(0.2)  # the whole response is in; the consumer is merely late
    assert await resp.read() == b"all here"


# -- releasing, cancelling, closing -------------------------------------------------------------


async def test_release_of_unfinished_stream_closes_its_connection(upstream, make_pool) -> None:
    up = await upstream(CHUNKED_HEAD + chunk(b"first"), response(b"after"))
    pool = make_pool(max_connections=1)
    resp = await pool.post(up.url(), b"", b"")
    stream = resp.chunks()
    assert await anext(stream) == b"first"
    resp.release()
    await eventually(lambda: 0 in up.eof)  # the upstream is told to stop
    resp = await asyncio.wait_for(pool.post(up.url(), b"", b""), 2)  # the one slot is free again
    assert await resp.read() == b"after"
    assert [r.conn for r in up.requests] == [0, 1]
    await stream.aclose()


async def test_connection_cap_under_concurrency(upstream, make_pool) -> None:
    async def slow_echo(req: Request, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        writer.write(response(req.body))

    up = await upstream(slow_echo)
    pool = make_pool(max_connections=2)

    async def call(i: int) -> bytes:
        return await (await pool.post(up.url(), b"", b"%d" % i)).read()

    bodies = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(5))), 3)
    assert bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert up.max_open == 2
    assert up.max_in_flight == 2
    assert up.connections == 2  # the two connections were reused for the other three
    assert len(up.requests) == 5


async def test_waiting_for_a_free_slot_counts_toward_the_deadline(upstream, make_pool) -> None:
    up = await upstream(CHUNKED_HEAD + chunk(b"first"))  # a stream that then stays silent
    pool = make_pool(max_connections=1, total_timeout_s=0.3)
    held = await pool.post(up.url(), b"", b"")  # holds the only slot until released
    start = time.monotonic()
    with pytest.raises(TransportTimeout, match="free connection"):
        await pool.post(up.url(), b"", b"")
    assert 0.25 <= time.monotonic() - start < 0.8
    assert len(up.requests) == 1  # the second never reached the upstream
    held.release()


async def test_cancelled_post_frees_its_slot(upstream, make_pool) -> None:
    up = await upstream(SILENT, response(b"second"))
    pool = make_pool(max_connections=1)
    task = asyncio.create_task(pool.post(up.url(), b"", b"1"))
    await eventually(lambda: len(up.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    resp = await asyncio.wait_for(pool.post(up.url(), b"", b"2"), 2)
    assert await resp.read() == b"second"
    assert [r.conn for r in up.requests] == [0, 1]
    await eventually(lambda: 0 in up.eof)  # the abandoned connection was closed


async def test_aclose_while_streaming_closes_the_connection(upstream, make_pool) -> None:
    up = await upstream(CHUNKED_HEAD + chunk(b"first"))
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    stream = resp.chunks()
    assert await anext(stream) == b"first"
    await pool.aclose()
    await eventually(lambda: 0 in up.eof)
    with pytest.raises(TransportError):
        await anext(stream)


async def test_aclose_while_waiting_for_response_head_closes_the_connection(upstream, make_pool) -> None:
    up = await upstream(SILENT)
    pool = make_pool(total_timeout_s=3.0)
    task = asyncio.create_task(pool.post(up.url(), b"", b""))
    await eventually(lambda: len(up.requests) == 1)
    await pool.aclose()
    try:
        await eventually(lambda: 0 in up.eof, timeout=1.0)
        with pytest.raises(TransportError):
            await asyncio.wait_for(task, 1.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_aclose_fails_posts_queued_for_a_slot(upstream, make_pool) -> None:
    up = await upstream(SILENT, response(b"late"))
    pool = make_pool(max_connections=1, total_timeout_s=3.0)
    first = asyncio.create_task(pool.post(up.url(), b"", b"1"))
    await eventually(lambda: len(up.requests) == 1)
    queued = asyncio.create_task(pool.post(up.url(), b"", b"2"))
    await asyncio.sleep(0.01)
    await pool.aclose()
    first.cancel()  # frees the slot the queued post waits for
    results = await asyncio.gather(first, asyncio.wait_for(queued, 1.0), return_exceptions=True)
    for result in results:
        if isinstance(result, PooledResponse):
            result.release()
    assert isinstance(results[1], ConnectError)
    assert len(up.requests) == 1  # the queued request never reached the upstream


# -- informational responses --------------------------------------------------------------------


@pytest.mark.parametrize("separate", [False, True], ids=["one-send", "two-sends"])
async def test_100_continue_is_skipped(upstream, make_pool, separate: bool) -> None:
    informational = b"HTTP/1.1 100 Continue\r\nX-Info: 1\r\n\r\n"
    final = response(b"real", headers=[("X-Final", "yes")])
    up = await upstream(slowly(informational, final) if separate else informational + final, response(b"again"))
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    assert resp.status == 200
    assert dict(resp.headers) == {"x-final": "yes", "content-length": "4"}
    assert await resp.read() == b"real"
    assert await (await pool.post(up.url(), b"", b"")).read() == b"again"
    assert [r.conn for r in up.requests] == [0, 0]  # the connection is still in sync


# -- backpressure -------------------------------------------------------------------------------

PAYLOAD = random.Random(7).randbytes(4 * 1024 * 1024)
PIECE = 64 * 1024


def large_body(framing: str) -> Reply:
    heads = {
        "chunked": CHUNKED_HEAD,
        "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD),
        "close-delimited": b"HTTP/1.1 200 OK\r\n\r\n",
    }

    async def reply(req: Request, writer: asyncio.StreamWriter) -> None:
        writer.write(heads[framing])
        for i in range(0, len(PAYLOAD), PIECE):
            piece = PAYLOAD[i : i + PIECE]
            writer.write(chunk(piece) if framing == "chunked" else piece)
            await writer.drain()
        if framing == "chunked":
            writer.write(LAST_CHUNK)
        elif framing == "close-delimited":
            writer.close()

    return reply


@pytest.mark.parametrize("framing", ["chunked", "content-length", "close-delimited"])
async def test_slow_consumer_gets_large_body_intact(upstream, make_pool, framing: str) -> None:
    up = await upstream(large_body(framing))
    pool = make_pool(total_timeout_s=10.0)
    resp = await pool.post(up.url(), b"", b"")
    conn = resp._conn  # white-box: to see the pause and the bounded buffer
    assert conn is not None and conn.transport is not None
    digest, size, most_buffered, paused = hashlib.sha256(), 0, 0, False
    async for piece in resp.chunks():
        digest.update(piece)
        size += len(piece)
        most_buffered = max(most_buffered, conn.buffered)
        paused = paused or not conn.transport.is_reading()
        await asyncio.sleep(0.002)
    assert size == len(PAYLOAD)
    assert digest.hexdigest() == hashlib.sha256(PAYLOAD).hexdigest()
    assert paused  # reading was paused at least once ...
    assert most_buffered < 1024 * 1024  # ... so the client never held much of the 4 MB


# -- encode_headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Evil\r\nInjected": "1"},
        {"X-Evil\n": "1"},
        {"X-Key": "a\r\nInjected: 1"},
        {"X-Key": "a\nb"},
        {"X-Key": "a\rb"},
        {"": "empty name"},
        {"Bad Name": "space"},
        {"Bad:Name": "colon"},
    ],
)
def test_encode_headers_rejects_invalid(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        encode_headers(headers)


def test_encode_headers_drops_the_headers_the_pool_writes() -> None:
    headers = {"Host": "evil", "content-length": "5", "CONNECTION": "close", "Transfer-Encoding": "chunked", "A": "1"}
    assert encode_headers(headers) == b"A: 1\r\n"


def test_encode_headers_later_name_in_other_case_replaces_earlier() -> None:
    block = encode_headers({"X-Key": "first", "Accept": "*/*", "x-KEY": "second"})
    assert block == b"x-KEY: second\r\nAccept: */*\r\n"


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (openssl CLI, as on every CI machine)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def _tls_upstream(tls_cert: tuple[Path, Path], *replies: Reply) -> Upstream:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*tls_cert)
    return await Upstream(replies).start(server_ctx)


async def test_https_request_over_tls(tls_cert: tuple[Path, Path]) -> None:
    up = await _tls_upstream(tls_cert, response(b"secret answer"))
    client_ctx = ssl.create_default_context(cafile=str(tls_cert[0]))
    pool = HttpPool(max_connections=2, connect_timeout_s=2.0, total_timeout_s=5.0, ssl_context=client_ctx)
    try:
        for _ in range(2):  # the second request reuses the TLS connection
            resp = await pool.post(f"https://localhost:{up.port}/v1/x", b"Content-Type: application/json\r\n", b"{}")
            assert resp.status == 200
            assert await resp.read() == b"secret answer"
        assert up.connections == 1
        assert up.requests[0].raw.startswith(b"POST /v1/x HTTP/1.1\r\nHost: localhost:%d\r\n" % up.port)
    finally:
        await pool.aclose()
        await up.aclose()


async def test_https_to_an_untrusted_certificate_is_a_connect_error(tls_cert: tuple[Path, Path]) -> None:
    up = await _tls_upstream(tls_cert, response(b"never sent"))
    pool = HttpPool(max_connections=2, connect_timeout_s=2.0, total_timeout_s=5.0)  # system CAs only
    try:
        with pytest.raises(ConnectError, match="TLS"):
            await pool.post(f"https://localhost:{up.port}/", b"", b"")
        assert up.requests == []
    finally:
        await pool.aclose()
        await up.aclose()


# -- body limits --------------------------------------------------------------------------------


async def test_a_declared_length_over_the_limit_fails_before_the_body_is_read(upstream, make_pool) -> None:
    up = await upstream(response(b"x" * 5000), response(b"small"))
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    with pytest.raises(BodyTooLargeError, match="5000 bytes"):
        await resp.read(4096)
    await eventually(lambda: 0 in up.eof)  # dropped, not drained and not reused
    assert await (await pool.post(up.url(), b"", b"")).read(4096) == b"small"
    assert up.requests[1].conn == 1


async def test_a_chunked_body_over_the_limit_fails_as_it_crosses_it(upstream, make_pool) -> None:
    big = CHUNKED_HEAD + b"".join(chunk(b"y" * 1000) for _ in range(10)) + LAST_CHUNK
    up = await upstream(big)
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    with pytest.raises(BodyTooLargeError, match="over 4096 bytes"):
        await resp.read(4096)
    await eventually(lambda: 0 in up.eof)
    # At the limit exactly is fine.
    resp = await pool.post(up.url(), b"", b"")
    assert await resp.read(10_000) == b"y" * 10_000


async def test_truncate_returns_the_first_bytes_and_drops_an_unfinished_connection(upstream, make_pool) -> None:
    whole = response(b"z" * 5000)
    up = await upstream(slowly(whole[:300], whole[300:], delay=0.2), response(b"z" * 5000))
    pool = make_pool()
    resp = await pool.post(up.url(), b"", b"")
    assert await resp.read(100, truncate=True) == b"z" * 100  # before the rest arrived
    assert resp.is_finished
    await eventually(lambda: 0 in up.eof)  # the unfinished body's connection is dropped
    # A body within the limit comes whole, and a finished connection is kept.
    assert await (await pool.post(up.url(), b"", b"")).read(10_000, truncate=True) == b"z" * 5000
    assert await (await pool.post(up.url(), b"", b"")).read(10, truncate=True) == b"z" * 10  # all in: kept
    await (await pool.post(up.url(), b"", b"")).read()
    assert [r.conn for r in up.requests] == [0, 1, 1, 1]


def test_body_too_large_maps_to_a_502() -> None:
    with pytest.raises(ProviderResponseError, match="upstream up sent a body over 10 bytes") as info, \
            map_transport_errors("up"):
        raise BodyTooLargeError("a body over 10 bytes")
    assert info.value.status == 502

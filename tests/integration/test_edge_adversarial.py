"""Hostile and unusual HTTP/1.1 input on real sockets, against the request edge (`setpoint.proxy.edge`).

Request smuggling shapes, broken chunked framing, malformed heads, odd methods and targets,
duplicate singleton headers, slow and stalled clients, and what a pipelined request after a refused
one becomes. Each case says what the client must see: the status, the OpenAI error shape where the
gateway answers itself, whether the connection is closed, that a request hidden in a body is never
served (its `user` marker never reaches the request log), and that the server still serves a normal
request afterwards.

Most cases run against three front ends:

- "edge": a fresh connection to the edge (it parses every byte itself);
- "edge-handed-over": an edge connection that already asked for /health, so it belongs to aiohttp
  (the edge passes its bytes on untouched);
- "aiohttp": `server.edge: false`, aiohttp serving everything (the reference).

aiohttp answers protocol errors with its own plain-text 400 (`HTTP/1.0 400 Bad Request`); the edge
answers them in the OpenAI error shape with `Connection: close`. Where the two differ, the test
asserts that the edge is at least as strict as aiohttp.

Framing basics (keep-alive, pipelining, chunked bodies, the body limit, the 64 KB head cap, the
idle timeout) are in test_edge.py; this module does not repeat them.
"""

from __future__ import annotations

import asyncio
import gc
import select
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.proxy.background import BackgroundGateway
from tests.conftest import ALL_KEY
from tests.integration.test_edge import (
    Conn,
    Response,
    assert_chat_ok,
    assert_openai_error,
    chat,
    chat_body,
    chunked,
    edge_config,
    get,
    port_of,
    request,
    served_by_aiohttp,
)

MAX_BODY = 4096  # the shared gateways' body limit
WRONG_KEY = "sk-wrong-key-0123456789abcdef"
FRONTS = ["edge", "edge-handed-over", "aiohttp"]
EDGE_AND_AIOHTTP = ["edge", "aiohttp"]

Rows = Callable[..., list[dict[str, Any]]]


# -- gateways -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, BackgroundGateway]]:
    """One edge gateway and one aiohttp-only gateway for the whole module (body limit 4 KB).
    Tests that count request records tag their requests with a unique `user` instead of counting."""
    started: dict[str, BackgroundGateway] = {}
    try:
        for name, edge in (("edge", True), ("aiohttp", False)):
            cfg = edge_config(edge=edge, max_body_bytes=MAX_BODY)
            cfg["data_dir"] = str(tmp_path_factory.mktemp(f"adversarial-{name}"))
            gw = BackgroundGateway(compile_config(parse_config(cfg, env={})))
            gw.__enter__()
            started[name] = gw
        assert started["edge"].server is not None and started["edge"].server.edge is not None
        assert started["aiohttp"].server is not None and started["aiohttp"].server.edge is None
        yield started
    finally:
        for gw in started.values():
            gw.__exit__(None, None, None)


def gateway_of(shared: dict[str, BackgroundGateway], front: str) -> BackgroundGateway:
    return shared["aiohttp" if front == "aiohttp" else "edge"]


def connect(shared: dict[str, BackgroundGateway], front: str, timeout_s: float = 5.0) -> Conn:
    """A connection to `front`; for "edge-handed-over", one the edge already handed to aiohttp."""
    c = Conn(port_of(gateway_of(shared, front)), timeout_s)
    if front == "edge-handed-over":
        try:
            health = c.send(get("/health")).read_response()
            assert health.status == 200 and served_by_aiohttp(health)
        except BaseException:
            c.close()
            raise
    return c


@pytest.fixture(autouse=True)
def _no_dropped_handlers() -> Iterator[None]:
    """Find an API handler the edge dropped in the test that dropped it.

    A `_Request._run` task left waiting on a future nobody will ever resolve is garbage: the
    collector destroys it some time later ("Task was destroyed but it is pending!"), running its
    `finally` (`conn.finished`) from wherever the collector happens to run, whose exception is then
    reported by pytest against whatever test is running at that moment. So automatic collection is
    off during each test, and the collection at its end catches such a handler here. (With
    collection off, everything the test allocated is still in the youngest generation: collecting
    that one is enough, and fast.)"""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        caught: list[Any] = []
        previous = sys.unraisablehook
        sys.unraisablehook = caught.append
        try:
            gc.collect(0)
        finally:
            sys.unraisablehook = previous
            if was_enabled:
                gc.enable()
        dropped = [u for u in caught if "_Request._run" in repr(u.object)]
        for u in caught:
            if u not in dropped:
                previous(u)
        assert not dropped, (
            f"{len(dropped)} edge API handler(s) were left pending forever and destroyed by the garbage "
            f"collector (raising {dropped[0].exc_type.__name__}: {dropped[0].exc_value} in their `finally`)"
        )


# -- helpers ------------------------------------------------------------------------------------


def marker() -> str:
    return f"m-{uuid.uuid4().hex[:16]}"


def marked_chat(user: str, **kw: Any) -> bytes:
    """A small chat request whose record carries `user` (to tell whether it was ever served)."""
    return chat(tokens=1, fields={"user": user}, **kw)


def records_of(gateway_rows: Rows, gw: BackgroundGateway, user: str) -> list[dict[str, Any]]:
    return gateway_rows(gw, "WHERE user_id = ?", (user,))


def assert_still_serving(gw: BackgroundGateway) -> None:
    with Conn(port_of(gw)) as c:
        assert_chat_ok(c.send(chat(tokens=2)).read_response(), tokens=2)


def assert_refused_and_closed(shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, bad: bytes,
                              **refused: Any) -> None:
    """`bad`, with a marked chat request pipelined after it: one refusal (`assert_refused`), the
    close, the pipelined request never served, and the gateway still serving."""
    after = marker()
    gw = gateway_of(shared, front)
    with connect(shared, front) as c:
        assert_refused(c.send(bad + marked_chat(after)).read_response(), "edge" if front == "edge" else "aiohttp",
                       **refused)
        c.assert_closed()
    assert records_of(gateway_rows, gw, after) == []
    assert_still_serving(gw)


def assert_refused(resp: Response, front: str, status: int = 400, code: str = "invalid_request",
                   aiohttp_statuses: tuple[int, ...] = (400,), *, own: bool = True) -> None:
    """A protocol-level refusal. The edge's own answer is OpenAI-shaped and says it closes; aiohttp's
    is its plain-text 4xx (only the status is checked). `own=False`: the edge may have passed the
    request on to aiohttp before its parser found the fault, so aiohttp's refusal is fine too."""
    if front == "edge" and (own or not served_by_aiohttp(resp)):
        assert_openai_error(resp, status, code)
        assert resp.header("Connection") == "close", resp.headers
    else:
        assert resp.status in aiohttp_statuses, (resp.status, resp.body[:300])


def head_with(lines: list[str], method: str = "POST", target: str = "/v1/chat/completions",
              version: str = "1.1") -> bytes:
    """A request head from raw header lines (each without its CRLF), after Host and Authorization."""
    all_lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1", f"Authorization: Bearer {ALL_KEY}",
                 "Content-Type: application/json", *lines]
    return ("\r\n".join(all_lines) + "\r\n\r\n").encode("latin-1")


def send_until_refused(c: Conn, piece: bytes, total: int) -> int:
    """Send `piece` repeatedly, up to `total` bytes or until the server stops taking them."""
    sent = 0
    try:
        while sent < total:
            c.sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def edge_handlers_running(gw: BackgroundGateway) -> int:
    """API handler tasks of the edge still alive on the gateway's loop."""

    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") == "_Request._run")

    loop = gw._loop  # the gateway's own loop: the test counts the handler tasks on it
    return asyncio.run_coroutine_threadsafe(count(), loop).result(timeout=5)


# -- request smuggling --------------------------------------------------------------------------
# The body of each request below hides a second, complete request (a chat tagged with a marker). A
# front end that frames the body differently from another (Content-Length vs chunked, one of two
# lengths, a Transfer-Encoding it half-understands) would serve the hidden request on its own. Each
# shape must be refused outright: one 400, the connection closed, the hidden request never served.


def _cl_te(hidden: bytes) -> tuple[list[str], bytes]:
    body = b"0\r\n\r\n" + hidden
    return [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"], body


def _te_cl(hidden: bytes) -> tuple[list[str], bytes]:
    body = b"0\r\n\r\n" + hidden
    return ["Transfer-Encoding: chunked", "Content-Length: 3"], body


def _with_te(te_lines: list[str]) -> Callable[[bytes], tuple[list[str], bytes]]:
    def shape(hidden: bytes) -> tuple[list[str], bytes]:
        body = b"0\r\n\r\n" + hidden
        return [f"Content-Length: {len(body)}", *te_lines], body

    return shape


def _two_lengths(hidden: bytes) -> tuple[list[str], bytes]:
    return ["Content-Length: 0", f"Content-Length: {len(hidden)}"], hidden


def _length_list(hidden: bytes) -> tuple[list[str], bytes]:
    return [f"Content-Length: 0, {len(hidden)}"], hidden


def _length_space_before_colon(hidden: bytes) -> tuple[list[str], bytes]:
    return [f"Content-Length : {len(hidden)}"], hidden  # ignored by a lax parser: no body, then `hidden`


SMUGGLING_SHAPES: dict[str, Callable[[bytes], tuple[list[str], bytes]]] = {
    "cl-then-te": _cl_te,
    "te-then-cl": _te_cl,
    "cl-te-gzip-chunked": _with_te(["Transfer-Encoding: gzip, chunked"]),
    "cl-te-chunked-identity": _with_te(["Transfer-Encoding: chunked, identity"]),
    "cl-te-space-before-colon": _with_te(["Transfer-Encoding : chunked"]),
    "cl-te-obs-fold": _with_te(["Transfer-Encoding:", " chunked"]),
    "cl-te-tab": _with_te(["Transfer-Encoding:\tchunked"]),
    "cl-te-vertical-tab": _with_te(["Transfer-Encoding:\x0bchunked"]),
    "cl-te-two-te-lines": _with_te(["Transfer-Encoding: chunked", "Transfer-Encoding: identity"]),
    "two-different-lengths": _two_lengths,
    "length-list": _length_list,
    "cl-space-before-colon": _length_space_before_colon,
}


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/unknown"], ids=["api", "for-aiohttp"])
@pytest.mark.parametrize("shape", list(SMUGGLING_SHAPES))
@pytest.mark.parametrize("front", [*FRONTS, "edge-behind-an-api-call"])
def test_request_hidden_in_a_body_is_never_served(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, shape: str, target: str
) -> None:
    hidden_user = marker()
    lines, body = SMUGGLING_SHAPES[shape](marked_chat(hidden_user))
    attack = head_with(lines, target=target) + body
    gw = gateway_of(shared, front)
    with connect(shared, "edge" if front == "edge-behind-an-api-call" else front) as c:
        if front == "edge-behind-an-api-call":  # parsed ahead while the edge answers the call before it
            c.send(chat(tokens=2) + attack)
            assert_chat_ok(c.read_response(), tokens=2)
        else:
            c.send(attack)
        assert_refused(c.read_response(), "aiohttp" if front == "edge-handed-over" else front.split("-")[0])
        c.assert_closed()  # exactly one answer for the attack, then the close
    assert records_of(gateway_rows, gw, hidden_user) == []
    assert_still_serving(gw)


# -- transfer codings ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/unknown"], ids=["api", "for-aiohttp"])
@pytest.mark.parametrize("coding", ["chunked, identity", "identity", "gzip", "xchunked", "chunked;q=1", "chunked, gzip"])
@pytest.mark.parametrize("front", FRONTS)
def test_transfer_encoding_not_ending_in_chunked_is_refused(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, coding: str, target: str
) -> None:
    """RFC 9112 6.3: a request whose last transfer coding is not chunked has no knowable length: 400
    and close. The request pipelined after it is not served. (llhttp finds some of these only after
    the head is complete, when the edge has already passed a request for aiohttp on: aiohttp's
    parser then refuses it too.)"""
    bad = head_with([f"Transfer-Encoding: {coding}"], target=target) + chunked(chat_body(tokens=1))
    assert_refused_and_closed(shared, gateway_rows, front, bad, own=target != "/v1/unknown")


@pytest.mark.parametrize("coding", ["gzip, chunked", "CHUNKED", "chunked, chunked"])
@pytest.mark.parametrize("front", FRONTS)
def test_transfer_encoding_ending_in_chunked_keeps_the_framing(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, coding: str
) -> None:
    """Whatever the server makes of the codings before `chunked` (accepting them, or refusing with
    400/501 and closing), the chunked framing decides where the request ends: the request pipelined
    after it is then either answered as a request of its own, or not at all."""
    after = marker()
    data = head_with([f"Transfer-Encoding: {coding}"]) + chunked(chat_body(tokens=2)) + marked_chat(after)
    gw = gateway_of(shared, front)
    with connect(shared, front) as c:
        first = c.send(data).read_response()
        if first.status == 200:
            assert_chat_ok(first, tokens=2)
            assert_chat_ok(c.read_response(), tokens=1)
            assert len(records_of(gateway_rows, gw, after)) == 1
        else:
            assert first.status in (400, 501), first.body
            c.assert_closed()
            assert records_of(gateway_rows, gw, after) == []
    assert_still_serving(gw)


@pytest.mark.parametrize("length", ["+5", "-1", "0x10", "5, 5", "1e3", " "])
@pytest.mark.parametrize("front", EDGE_AND_AIOHTTP)
def test_malformed_content_length_is_refused(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, length: str
) -> None:
    after = marker()
    data = head_with([f"Content-Length: {length}"]) + b"{}\r\n" + marked_chat(after)
    with connect(shared, front) as c:
        assert_refused(c.send(data).read_response(), front)
        c.assert_closed()
    assert records_of(gateway_rows, gateway_of(shared, front), after) == []


def test_repeated_identical_content_length_is_refused_or_honoured(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows
) -> None:
    """RFC 9112 6.3 lets a server accept `Content-Length: n` given twice with the same value; the edge
    (llhttp) refuses it. Either way it never desynchronises: pin that it is at least as strict as aiohttp."""
    body = chat_body(tokens=1)
    data = head_with([f"Content-Length: {len(body)}", f"Content-Length: {len(body)}"]) + body
    statuses = {}
    for front in EDGE_AND_AIOHTTP:
        with connect(shared, front) as c:
            resp = c.send(data).read_response()
            statuses[front] = resp.status
            if resp.status == 400:
                assert_refused(resp, front)
                c.assert_closed()
    assert statuses["edge"] == 400 or statuses["aiohttp"] != 400, statuses


# -- chunked bodies -----------------------------------------------------------------------------

GOOD_CHUNK = b'5\r\n{"mod\r\n'
BAD_CHUNKS: dict[str, bytes] = {
    "not-hex": GOOD_CHUNK + b"zz\r\nabc\r\n0\r\n\r\n",
    "negative": b"-1\r\nabc\r\n0\r\n\r\n",
    "0x-prefix": b"0x3\r\nabc\r\n0\r\n\r\n",
    "overflow": b"10000000000000000\r\nabc\r\n0\r\n\r\n",  # 2**64
    "empty-size-line": GOOD_CHUNK + b"\r\nabc\r\n0\r\n\r\n",
    "space-in-size": b"1 0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "data-longer-than-size": b"3\r\nabcdef\r\n0\r\n\r\n",
    "lf-only": b'5\n{"mod\n0\n\n',
    "nul-in-extension": b"3;\x00\r\nabc\r\n0\r\n\r\n",
    "unclosed-quoted-extension": b'3;a="b\r\nabc\r\n0\r\n\r\n',
}


@pytest.mark.parametrize("case", list(BAD_CHUNKS))
@pytest.mark.parametrize("front", FRONTS)
def test_invalid_chunk_framing_is_400_and_closed(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, case: str
) -> None:
    assert_refused_and_closed(shared, gateway_rows, front, head_with(["Transfer-Encoding: chunked"]) + BAD_CHUNKS[case])


@pytest.mark.parametrize("front", FRONTS)
def test_chunk_extensions_are_ignored(shared: dict[str, BackgroundGateway], front: str) -> None:
    body = chat_body(tokens=3)
    exts = [b";a=b", b';name="quoted;value"', b";flag", b";x=1;y=2"]
    pieces = [body[i:i + 9] for i in range(0, len(body), 9)]
    framed = b"".join(b"%x%b\r\n%b\r\n" % (len(p), exts[i % len(exts)], p) for i, p in enumerate(pieces))
    with connect(shared, front) as c:
        c.send(head_with(["Transfer-Encoding: chunked"]) + framed + b"0;last=1\r\n\r\n")
        assert_chat_ok(c.read_response(), tokens=3)
        assert_chat_ok(c.send(chat(tokens=2)).read_response(), tokens=2)  # the framing stayed in step


@pytest.mark.parametrize("front", FRONTS)
def test_chunked_body_over_the_limit_is_413_before_it_ends(shared: dict[str, BackgroundGateway], front: str) -> None:
    """One 8 KB chunk (the limit is 4 KB) and not the end of the body: the answer is a 413 at once,
    not a wait for the end. The edge then closes without reading the rest; aiohttp reads and drops
    the rest of the body and keeps the connection."""
    with connect(shared, front) as c:
        c.send(head_with(["Transfer-Encoding: chunked"]) + b"2000\r\n" + b"x" * 0x2000)
        resp = c.read_response()
        assert_openai_error(resp, 413, "payload_too_large")
        if front == "edge":
            assert resp.header("Connection") == "close"
        if resp.header("Connection") == "close":
            c.assert_closed()
        else:
            c.send(b"\r\n0\r\n\r\n")
            assert_chat_ok(c.send(chat(tokens=1)).read_response(), tokens=1)
    assert_still_serving(gateway_of(shared, front))


@pytest.mark.parametrize("front", FRONTS)
def test_truncated_chunked_body_then_close_is_a_499(
    make_gateway: Callable[..., BackgroundGateway], gateway_rows: Rows, wait_until: Callable[..., None], front: str
) -> None:
    """Head and part of a chunked body, then the client leaves: recorded as 499 client_disconnected
    (as the edge does for a Content-Length body in test_edge.py), never as a 500."""
    gw = make_gateway(edge_config(edge=front != "aiohttp"))
    with Conn(port_of(gw)) as c:
        if front == "edge-handed-over":
            assert served_by_aiohttp(c.send(get("/health")).read_response())
        c.send(head_with(["Transfer-Encoding: chunked"]) + GOOD_CHUNK + b"a")
        c.assert_open(0.1)  # the handler is waiting for the rest
    rows: list[dict[str, Any]] = []

    def recorded() -> bool:
        nonlocal rows
        rows = gateway_rows(gw)
        return len(rows) >= 1

    wait_until(recorded, 5.0, "the request record")
    assert [(r["status"], r["error_code"]) for r in rows] == [(499, "client_disconnected")]


def test_malformed_chunk_leaves_no_handler_behind(make_gateway: Callable[..., BackgroundGateway],
                                                  wait_until: Callable[..., None]) -> None:
    """The handler of an API call whose chunked body turns out malformed must end (cancelled, or
    told the client left), not wait forever for a body that will never come."""
    gw = make_gateway(edge_config())
    with Conn(port_of(gw)) as c:
        c.send(head_with(["Transfer-Encoding: chunked"]) + GOOD_CHUNK)
        c.assert_open(0.1)  # the handler started and waits for the rest of the body
        assert edge_handlers_running(gw) == 1
        c.send(b"zz\r\n")
        assert_openai_error(c.read_response(), 400, "invalid_request")
        c.assert_closed()
    assert_still_serving(gw)  # the loop went round many times since the close
    wait_until(lambda: edge_handlers_running(gw) == 0, 1.0, "the malformed request's handler to end")


# -- malformed heads ----------------------------------------------------------------------------

MALFORMED_HEADS: dict[str, bytes] = {
    "header-without-colon": head_with(["X-Foo bar"]),
    "space-before-colon": head_with(["X-Foo : bar"]),
    "obs-fold": head_with(["X-Foo: a", "  b"]),
    "whitespace-before-first-header": b"GET /v1/models HTTP/1.1\r\n Host: 127.0.0.1\r\n\r\n",
    "empty-header-name": head_with([": value"]),
    "control-char-in-name": head_with(["X-F\x01oo: a"]),
    "nul-in-value": head_with(["X-Foo: a\x00b"]),
    "bare-cr-in-value": head_with(["X-Foo: a\rb"]),
    "bare-lf-line-ends": f"GET /v1/models HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {ALL_KEY}\n\n".encode(),
    "raw-utf8-in-target": "GET /v1/models/caf\u00e9 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
    "raw-latin1-in-target": b"GET /v1/models/caf\xe9 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "nul-in-target": b"GET /v1/models\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "space-in-target": b"GET /v1/mo dels HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "invalid-method": b"G(T /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "unknown-version": b"GET /v1/models HTTP/1.7\r\nHost: 127.0.0.1\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADS))
@pytest.mark.parametrize("front", FRONTS)
def test_malformed_head_is_400_and_the_pipelined_request_is_not_served(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, case: str
) -> None:
    assert_refused_and_closed(shared, gateway_rows, front, MALFORMED_HEADS[case])


@pytest.mark.parametrize("front", FRONTS)
def test_percent_encoded_odd_bytes_in_a_model_id(shared: dict[str, BackgroundGateway], front: str) -> None:
    """Encoded non-ASCII, invalid UTF-8, NUL and dot segments in a model id: an OpenAI 404, kept alive."""
    with connect(shared, front) as c:
        for target in ("/v1/models/caf%C3%A9", "/v1/models/%FF%FE", "/v1/models/chat-a%00", "/v1/models/..%2F..%2Fadmin",
                       "/v1/models/%2e%2e"):
            resp = c.send(get(target)).read_response()
            assert_openai_error(resp, 404)
            assert resp.header("Connection") is None
        assert c.send(get("/v1/models/chat%2Da")).read_response().json()["id"] == "chat-a"


@pytest.mark.parametrize("front", EDGE_AND_AIOHTTP)
def test_absurdly_long_request_line_is_refused_before_it_ends(shared: dict[str, BackgroundGateway], front: str) -> None:
    """A 4 MB request target, never terminated: refused once past the cap, without reading the rest."""
    with connect(shared, front, timeout_s=3) as c:
        c.send(b"GET /v1/models?q=")
        send_until_refused(c, b"a" * 65536, 4 * 1024 * 1024)
        resp = c.read_response()
        if front == "edge":
            assert_openai_error(resp, 431, "request_headers_too_large")
        else:
            assert resp.status in (400, 414, 431), resp.body[:200]
        c.assert_closed()
    assert_still_serving(gateway_of(shared, front))


@pytest.mark.parametrize("part", ["value", "name"])
@pytest.mark.parametrize("front", EDGE_AND_AIOHTTP)
def test_unterminated_header_line_is_refused_before_it_ends(
    shared: dict[str, BackgroundGateway], front: str, part: str
) -> None:
    """One header line of 1 MB that never ends: refused once past the 64 KB head cap, as a long
    request line is, not buffered until its end (which never comes)."""
    with connect(shared, front, timeout_s=1) as c:
        c.send(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n" + (b"X-Big: " if part == "value" else b"X-Big"))
        sent = send_until_refused(c, b"a" * 65536, 1024 * 1024)
        try:
            resp = c.read_response()
        except TimeoutError:
            pytest.fail(f"no answer after {sent} bytes of one unterminated header {part}: the head cap is not applied")
        if front == "edge":
            assert_openai_error(resp, 431, "request_headers_too_large")
        else:
            assert resp.status in (400, 431), resp.body[:200]
        c.assert_closed()
    assert_still_serving(gateway_of(shared, front))


def test_many_small_headers(shared: dict[str, BackgroundGateway]) -> None:
    """The edge caps the head by size (64 KB) and by count (128 lines, as aiohttp does): 120 tiny
    headers are served; 129 and 12000 are a 431, answered without parsing the rest."""
    def with_headers(n: int) -> bytes:
        return get("/v1/models", headers={f"x{i}": "v" for i in range(n)})

    with connect(shared, "edge") as c:
        resp = c.send(with_headers(120)).read_response()
        assert resp.status == 200 and len(resp.json()["data"]) == 3
    for n in (129, 12000):
        with connect(shared, "edge") as c:
            resp = c.send(with_headers(n)).read_response()
            assert_openai_error(resp, 431, "request_headers_too_large")
            assert "128 header lines" in resp.json()["error"]["message"]
            c.assert_closed()
    with connect(shared, "aiohttp") as c:
        assert c.send(with_headers(4000)).read_response().status in (400, 431)


# -- Host and Authorization ---------------------------------------------------------------------

HOST_CASES: dict[str, bytes] = {
    "missing": get("/v1/models").replace(b"Host: 127.0.0.1\r\n", b""),
    "twice": get("/v1/models").replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nHost: evil.example\r\n"),
}


@pytest.mark.parametrize("case", list(HOST_CASES))
@pytest.mark.parametrize("front", FRONTS)
def test_http11_request_without_exactly_one_host_is_400(shared: dict[str, BackgroundGateway], front: str, case: str) -> None:
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header, or with
    more than one (aiohttp does)."""
    with connect(shared, front) as c:
        resp = c.send(HOST_CASES[case]).read_response()
        assert resp.status == 400, f"an HTTP/1.1 request with Host {case} was answered {resp.status}"
        assert_refused(resp, "edge" if front == "edge" else "aiohttp")
        c.assert_closed()


@pytest.mark.parametrize("front", FRONTS)
def test_http10_request_without_host_is_served(shared: dict[str, BackgroundGateway], front: str) -> None:
    with connect(shared, front) as c:
        resp = c.send(get("/v1/models", version="1.0").replace(b"Host: 127.0.0.1\r\n", b"")).read_response()
        assert resp.status == 200 and len(resp.json()["data"]) == 3


def test_authorization_given_twice(shared: dict[str, BackgroundGateway]) -> None:
    """Two Authorization headers are refused (401) on both front ends, whichever holds the right
    key: which one counts would be a guess, and a proxy in front may have read the other."""
    def twice(first: str, second: str, data: bytes) -> bytes:
        return data.replace(f"Authorization: Bearer {ALL_KEY}\r\n".encode(),
                            f"Authorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\n".encode())

    for data in (chat(tokens=1), get("/v1/models"), request("POST", "/v1/embeddings", orjson.dumps({"model": "embed", "input": "x"}))):
        for front in EDGE_AND_AIOHTTP:
            with connect(shared, front) as c:
                for first, second in ((WRONG_KEY, ALL_KEY), (ALL_KEY, WRONG_KEY), (ALL_KEY, ALL_KEY)):
                    resp = c.send(twice(first, second, data)).read_response()
                    body = assert_openai_error(resp, 401, "invalid_api_key")
                    assert "one Authorization header" in body["message"]
                    assert WRONG_KEY not in resp.body.decode() and ALL_KEY not in resp.body.decode()
                assert c.send(data).read_response().status == 200  # one header: served, same connection


NON_UTF8_HEADERS: list[tuple[str, bytes, bytes]] = [
    ("authorization-chat", b"Authorization: Bearer sk-\xff\xfe-0123456789abcdef", chat(tokens=1, key=None)),
    ("authorization-models", b"Authorization: Bearer sk-\xff\xfe-0123456789abcdef", get("/v1/models", key=None)),
    ("authorization-admin", b"Authorization: Bearer mk-\xff\xfe-0123456789abcdef", get("/admin/keys", key=None)),
    ("x-api-key", b"x-api-key: sk-\xff-0123456789abcdef", chat(tokens=1, key=None)),
    ("x-setpoint-user", b"x-setpoint-user: u\xffser", chat(tokens=1)),
    ("x-setpoint-run-id", b"x-setpoint-run-id: run-\xff", chat(tokens=1)),
    ("x-setpoint-priority", b"x-setpoint-priority: \xff", chat(tokens=1)),
    ("x-setpoint-deadline-ms", b"x-setpoint-deadline-ms: \xff", chat(tokens=1)),
    ("x-setpoint-cache", b"x-setpoint-cache: \xff", chat(tokens=1)),
]


def with_header_line(data: bytes, line: bytes) -> bytes:
    """`data` (one request) with a raw header line added at the end of its head."""
    head, sep, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n" + line + sep + body


@pytest.mark.parametrize(("line", "data"), [(line, data) for _, line, data in NON_UTF8_HEADERS],
                         ids=[name for name, _, _ in NON_UTF8_HEADERS])
@pytest.mark.parametrize("front", EDGE_AND_AIOHTTP)
def test_header_value_that_is_not_utf8_never_gets_a_500(
    shared: dict[str, BackgroundGateway], front: str, line: bytes, data: bytes
) -> None:
    """obs-text (bytes >= 0x80) is legal in a field value; whatever it means to the gateway, the
    answer is a success or an OpenAI-shaped 4xx, never an internal error."""
    with connect(shared, front) as c:
        resp = c.send(with_header_line(data, line)).read_response()
        assert resp.status < 500, (resp.status, resp.body[:300])
        if resp.status >= 400:
            assert_openai_error(resp, resp.status)
    assert_still_serving(gateway_of(shared, front))


# -- methods and targets ------------------------------------------------------------------------

API_PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/models", "/chat/completions", "/embeddings", "/models"]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("front", FRONTS)
def test_other_methods_on_api_paths(shared: dict[str, BackgroundGateway], front: str, method: str) -> None:
    """405 method_not_allowed in the OpenAI shape on each API path (404 not_found on a model's path),
    and the connection stays usable."""
    with connect(shared, front) as c:
        for path in API_PATHS:
            resp = c.send(request(method, path, b"{}" if method in ("PUT", "PATCH") else None)).read_response()
            assert_openai_error(resp, 405, "method_not_allowed")
            assert resp.header("Connection") is None, (path, resp.headers)
        resp = c.send(request(method, "/v1/models/chat-a")).read_response()
        assert resp.status in (404, 405)
        assert_openai_error(resp, resp.status)
        assert_chat_ok(c.send(chat(tokens=2)).read_response(), tokens=2)


@pytest.mark.parametrize("target", ["CONNECT 127.0.0.1:443", "CONNECT /v1/models", "OPTIONS *"])
@pytest.mark.parametrize("front", EDGE_AND_AIOHTTP)
def test_authority_and_asterisk_form_targets_get_an_openai_error(
    shared: dict[str, BackgroundGateway], front: str, target: str
) -> None:
    """Unknown endpoints and methods get the OpenAI error shape (README), whatever the request-target form."""
    with connect(shared, front) as c:
        resp = c.send(f"{target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALL_KEY}\r\n\r\n".encode()).read_response()
        assert 400 <= resp.status < 500
        assert_openai_error(resp, resp.status)


@pytest.mark.parametrize("path", ["/v1/models", "/models", "/v1/models/chat-a"])
@pytest.mark.parametrize("front", FRONTS)
def test_head_on_models(shared: dict[str, BackgroundGateway], front: str, path: str) -> None:
    """HEAD: the GET answer's head and no body, so the next answer on the connection follows at once."""
    with connect(shared, front) as c:
        head = c.send(request("HEAD", path)).read_response(head_only=True)
        assert head.status == 200
        assert (head.header("Content-Type") or "").startswith("application/json")
        denied = c.send(request("HEAD", path, key=None)).read_response(head_only=True)
        assert denied.status == 401
        full = c.send(get(path)).read_response()  # parsed right after the bodiless answers
        assert full.status == 200 and full.json()
        length = head.header("Content-Length")
        assert length is None or int(length) == len(full.body)


# -- slow, stalled and pipelined clients --------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
def test_slow_client_sending_a_byte_at_a_time_is_served(shared: dict[str, BackgroundGateway], front: str) -> None:
    """Head and chunked body one byte per send (chunk-size lines and CRLFs split across reads)."""
    data = head_with(["Transfer-Encoding: chunked"]) + chunked(chat_body(tokens=3), 11)
    with connect(shared, front) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            c.send(data[i:i + 1])
            time.sleep(0.0005)
        assert_chat_ok(c.read_response(), tokens=3)
        assert_chat_ok(c.send(chat(tokens=1)).read_response(), tokens=1)


@pytest.mark.parametrize("after_a_request", [False, True], ids=["fresh", "kept-alive"])
@pytest.mark.parametrize("edge", [True, False], ids=["edge", "aiohttp"])
def test_half_a_head_then_silence(
    make_gateway: Callable[..., BackgroundGateway], gateway_rows: Rows, edge: bool, after_a_request: bool
) -> None:
    """A client sends part of a head and goes silent: other connections are served meanwhile, and the
    silent one is closed by the idle timeout (0.3 s here) without an answer."""
    gw = make_gateway(edge_config(edge=edge, keepalive_timeout_s=0.3))
    port = port_of(gw)
    with Conn(port) as stalled:
        if after_a_request:
            assert_chat_ok(stalled.send(chat(tokens=1)).read_response(), tokens=1)
        stalled.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        with Conn(port) as other:
            for n in (2, 3):
                assert_chat_ok(other.send(chat(tokens=n)).read_response(), tokens=n)
        stalled.assert_closed(timeout_s=5)
    assert_still_serving(gw)
    assert [r["status"] for r in gateway_rows(gw)] == [200] * (after_a_request + 2 + 1)  # no record for the stalled one


def test_a_head_trickled_past_the_timeout_is_closed(make_gateway: Callable[..., BackgroundGateway]) -> None:
    """A byte of head every 0.1 s keeps the connection active but never completes the head: the
    edge closes it once the head has taken longer than the keep-alive timeout (0.4 s here)."""
    gw = make_gateway(edge_config(keepalive_timeout_s=0.4))
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    with Conn(port_of(gw)) as c:
        started = time.monotonic()
        closed_after = None
        for i in range(len(head)):
            try:
                c.send(head[i:i + 1])
            except OSError:
                closed_after = time.monotonic() - started
                break
            readable, _, _ = select.select([c.sock], [], [], 0.1)
            if readable:
                try:
                    got = c.sock.recv(1, socket.MSG_PEEK)
                except ConnectionResetError:
                    got = b""
                assert got == b"", f"an answer to half a head: {got!r}"
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None, "a head trickled for 20 s was never cut off"
    assert_still_serving(gw)


def test_a_body_that_stops_coming_is_closed_and_recorded_499(
    make_gateway: Callable[..., BackgroundGateway], gateway_rows: Rows, wait_until: Callable[..., None]
) -> None:
    """Head complete, half the body, then silence: the handler waiting for the body does not wait
    forever; the connection is closed after the keep-alive timeout and the request recorded 499."""
    gw = make_gateway(edge_config(keepalive_timeout_s=0.3))
    body = chat_body(tokens=1)
    with Conn(port_of(gw)) as c:
        c.send(head_with([f"Content-Length: {len(body)}"]) + body[: len(body) // 2])
        c.assert_closed(timeout_s=5)
    wait_until(lambda: len(gateway_rows(gw)) == 1, 5.0, "the request record")
    assert [(r["status"], r["error_code"]) for r in gateway_rows(gw)] == [(499, "client_disconnected")]
    assert_still_serving(gw)


@pytest.mark.parametrize("first", ["413-length", "431-head", "400-head"])
@pytest.mark.parametrize("front", FRONTS)
def test_request_pipelined_after_a_refused_one(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str, first: str
) -> None:
    """If the refusal closes the connection (`Connection: close`, or aiohttp's HTTP/1.0 400), the
    request pipelined after it is never served; if it keeps the connection, it is answered next."""
    after = marker()
    refused = {
        "413-length": request("POST", "/v1/chat/completions", b"x" * (MAX_BODY + 904)),
        "431-head": get("/v1/models", headers={"X-Big": "a" * 70_000}),
        "400-head": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nNo colon here\r\n\r\n",
    }[first]
    gw = gateway_of(shared, front)
    with connect(shared, front) as c:
        resp = c.send(refused + marked_chat(after)).read_response()
        assert resp.status in {"413-length": (413,), "431-head": (431, 400), "400-head": (400,)}[first]
        if front == "edge":
            assert_openai_error(resp, resp.status)
        closes = resp.header("Connection") == "close" or resp.version == "HTTP/1.0"
        if front == "edge":
            assert closes  # the edge never reads past a refused request
        if closes:
            c.assert_closed()
            assert records_of(gateway_rows, gw, after) == []
        else:
            assert_chat_ok(c.read_response(), tokens=1)
            assert len(records_of(gateway_rows, gw, after)) == 1
    assert_still_serving(gw)


@pytest.mark.parametrize("front", FRONTS)
def test_request_pipelined_after_an_application_400_is_served(
    shared: dict[str, BackgroundGateway], gateway_rows: Rows, front: str
) -> None:
    """A 400 from the API (invalid JSON) is not a framing error: the connection is kept and the
    request pipelined after it is answered."""
    after = marker()
    with connect(shared, front) as c:
        c.send(request("POST", "/v1/chat/completions", b'{"model": "chat-a", "messages": [') + marked_chat(after))
        bad = c.read_response()
        assert_openai_error(bad, 400, "invalid_request")
        assert bad.header("Connection") is None
        assert_chat_ok(c.read_response(), tokens=1)
        c.assert_open()
    assert len(records_of(gateway_rows, gateway_of(shared, front), after)) == 1


@pytest.mark.parametrize("front", FRONTS)
def test_http10_expect_100_continue_gets_no_interim_answer(shared: dict[str, BackgroundGateway], front: str) -> None:
    """RFC 9110 10.1.1: a server MUST ignore a 100-continue expectation in an HTTP/1.0 request (an
    HTTP/1.0 client does not know 1xx answers)."""
    body = chat_body(tokens=2)
    with connect(shared, front) as c:
        c.send(request("POST", "/v1/chat/completions", None, version="1.0",
                       headers={"Content-Length": str(len(body)), "Expect": "100-continue"}))
        c.assert_open(0.2)  # no "HTTP/1.1 100 Continue" while the body is awaited
        resp = c.send(body).read_response()
        assert_chat_ok(resp, tokens=2)



@pytest.mark.parametrize("version", ["2.0", "0.9"])
def test_an_http_version_other_than_1x_is_505_on_the_edge(shared: dict[str, BackgroundGateway], version: str) -> None:
    """llhttp parses "HTTP/2.0" or "HTTP/0.9" in a request line like any version; the edge speaks 1.0 and 1.1 only
    and says so (505), instead of answering in HTTP/1.1 as if nothing were odd."""
    with connect(shared, "edge") as c:
        resp = c.send(head_with([], method="GET", target="/v1/models", version=version)).read_response()
        assert_refused(resp, "edge", 505, "http_version_not_supported")
        c.assert_closed()
    assert_still_serving(gateway_of(shared, "edge"))

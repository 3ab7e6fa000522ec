"""The request edge (`setpoint.proxy.edge`): HTTP/1.1 framing on real sockets.

The edge serves the API endpoints itself and hands a connection to aiohttp at its first request
for anything else. These tests talk raw HTTP over TCP where framing matters (keep-alive,
pipelining, chunked bodies, `Expect: 100-continue`, HTTP/1.0, limits, idle timeout, shutdown) and
compare the edge with aiohttp serving everything (`server.edge: false`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Self

import httpx
import openai
import orjson
import pytest

from setpoint.config.compile import compile_config
from setpoint.config.load import parse_config
from setpoint.proxy.background import BackgroundGateway
from tests.conftest import ALL_KEY, default_config, sim_provider
from tests.integration.test_errors import assert_error, sse_events

MESSAGES = [{"role": "user", "content": "hello there"}]
DONE = b"data: [DONE]\n\n"
UPSTREAM_MODEL = {"chat-a": "sim-small", "chat-b": "sim-large"}  # answers name the deployment's model
TIMEOUT_S = 10.0  # any single socket read; a hang fails the test instead of blocking it


# -- configs ------------------------------------------------------------------------------------


def edge_config(*, edge: bool = True, slow: bool = False, **server: Any) -> dict[str, Any]:
    """The default config with `server.edge` set; `slow` makes streamed tokens 50 ms apart."""
    cfg = default_config()
    cfg["server"] = {"edge": edge, **server}
    if slow:
        cfg["providers"] = {"sim": sim_provider(latency={"ttft_ms": 1, "per_token_ms": 50, "jitter": 0})}
    return cfg


# -- requests -----------------------------------------------------------------------------------


def request(
    method: str, target: str, body: bytes | None = None, *, key: str | None = ALL_KEY, version: str = "1.1",
    headers: dict[str, str] | None = None,
) -> bytes:
    """One HTTP request as bytes; a body gets a Content-Length unless `headers` frame it."""
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1"]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    hdrs = dict(headers or {})
    if body is not None and not any(h.lower() in ("content-length", "transfer-encoding") for h in hdrs):
        hdrs["Content-Length"] = str(len(body))
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chat_body(model: str = "chat-a", *, stream: bool = False, tokens: int | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, **extra}
    if stream:
        body["stream"] = True
    if tokens is not None:
        body["sim_output_tokens"] = tokens  # the simulated provider answers exactly this many tokens
    return orjson.dumps(body)


def chat(model: str = "chat-a", *, stream: bool = False, tokens: int | None = None, path: str = "/v1/chat/completions",
         fields: dict[str, Any] | None = None, **kw: Any) -> bytes:
    """A chat request (`fields`: more body fields; `kw`: `request` options)."""
    return request("POST", path, chat_body(model, stream=stream, tokens=tokens, **(fields or {})), **kw)


def get(target: str, **kw: Any) -> bytes:
    return request("GET", target, **kw)


def chunked(body: bytes, size: int = 7) -> bytes:
    """`body` in the chunked transfer coding, `size` bytes a chunk."""
    parts = [b"%x\r\n%b\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


# -- responses ----------------------------------------------------------------------------------


@dataclass
class Response:
    """One HTTP response as it came off the wire."""

    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    framing: str  # "length", "chunked", "close" or "none" (1xx)
    raw_body: bytes = field(repr=False, default=b"")  # as framed on the wire

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times: {self.headers}"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def as_httpx(self) -> httpx.Response:
        """For the shared assertion helpers (`assert_error`)."""
        headers = [(k, v) for k, v in self.headers if k.lower() not in ("transfer-encoding", "content-length")]
        return httpx.Response(self.status, headers=headers, content=self.body)

    @property
    def events(self) -> list[str]:
        return sse_events(self.body.decode())


class Conn:
    """A client connection that reads responses one at a time, exactly as framed."""

    def __init__(self, port: int, timeout_s: float = TIMEOUT_S) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.buf = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> Conn:
        self.sock.sendall(data)
        return self

    def _more(self) -> bytes:
        data = self.sock.recv(65536)
        self.buf += data
        return data

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._more():
                raise AssertionError(f"connection closed before {marker!r}; got {self.buf[:300]!r}")
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise AssertionError(f"connection closed after {len(self.buf)} of {n} body bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> tuple[str, int, list[tuple[str, str]]]:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version in ("HTTP/1.0", "HTTP/1.1"), status_line
        headers = []
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"malformed header line {line!r}"
            headers.append((name, value.strip()))
        return version, int(status), headers

    def read_response(self, *, head_only: bool = False) -> Response:
        """Exactly one response: the body by Content-Length, chunked, or until the server closes."""
        version, status, headers = self.read_head()
        resp = Response(status, version, headers, b"", "none")
        if 100 <= status < 200 or status in (204, 304) or head_only:
            return resp
        te = resp.header("Transfer-Encoding")
        length = resp.header("Content-Length")
        if te is not None:
            assert te.lower() == "chunked", te
            assert length is None, "both Transfer-Encoding and Content-Length"
            resp.framing, resp.body, resp.raw_body = "chunked", *self._read_chunked()
        elif length is not None:
            resp.framing = "length"
            resp.body = resp.raw_body = self._read_exact(int(length))
        else:
            resp.framing = "close"
            while self._more():
                pass
            resp.body = resp.raw_body = self.buf
            self.buf = b""
        return resp

    def _read_chunked(self) -> tuple[bytes, bytes]:
        body, raw = [], []
        while True:
            size_line = self._read_until(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            data = self._read_exact(size)
            assert self._read_exact(2) == b"\r\n", "chunk not followed by CRLF"
            raw.append(size_line + b"\r\n" + data + b"\r\n")
            body.append(data)
            if size == 0:
                return b"".join(body), b"".join(raw)

    def read_event(self) -> bytes:
        """The next chunk of a chunked stream whose head was read with `head_only=True`."""
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        data = self._read_exact(size)
        assert self._read_exact(2) == b"\r\n"
        return data

    def assert_closed(self, timeout_s: float = 5.0) -> None:
        """The server closes the connection (within `timeout_s`) and sent nothing more."""
        self.sock.settimeout(timeout_s)
        try:
            assert self._more() == b"", f"expected the server to close; got more bytes: {self.buf[:300]!r}"
        except ConnectionResetError:
            pass  # closed (with unread bytes on the server's side)
        finally:
            self.sock.settimeout(TIMEOUT_S)
        assert self.buf == b"", f"unread bytes before the close: {self.buf[:300]!r}"

    def assert_open(self, wait_s: float = 0.2) -> None:
        """Nothing arrives and the connection is still open after `wait_s`."""
        self.sock.settimeout(wait_s)
        try:
            data = self._more()
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(TIMEOUT_S)
        raise AssertionError(f"expected an open, silent connection; got {data[:300]!r}")


def exchange(port: int, data: bytes) -> Response:
    """One request on a new connection; returns its response."""
    with Conn(port) as c:
        return c.send(data).read_response()


def assert_chat_ok(resp: Response, *, tokens: int | None = None, model: str = "chat-a") -> dict[str, Any]:
    """A unary chat answer, framed by an exact Content-Length, with Date and x-request-id."""
    assert resp.status == 200, resp.body
    assert resp.framing == "length"
    assert resp.header("Content-Type") == "application/json"
    assert_common_headers(resp)
    doc = resp.json()
    assert doc["object"] == "chat.completion" and doc["model"] == UPSTREAM_MODEL[model], doc
    assert doc["choices"][0]["message"]["role"] == "assistant"
    if tokens is not None:
        assert doc["usage"]["completion_tokens"] == tokens, doc["usage"]
    return doc


def assert_stream_ok(resp: Response, *, tokens: int | None = None, framing: str = "chunked") -> list[dict[str, Any]]:
    """An SSE answer that ends with `data: [DONE]`; returns the JSON events before it."""
    assert resp.status == 200, resp.body
    assert resp.framing == framing
    assert resp.header("Content-Type") == "text/event-stream"
    assert_common_headers(resp)
    assert resp.body.endswith(DONE), resp.body[-200:]
    events = resp.events
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    if tokens is not None:
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == tokens
    return chunks


def assert_common_headers(resp: Response) -> None:
    date = resp.header("Date")
    assert date is not None, resp.headers
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 60, date
    assert (resp.header("x-request-id") or "").startswith("req_"), resp.headers


def assert_openai_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    return assert_error(resp.as_httpx(), status, code=code)


def served_by_aiohttp(resp: Response) -> bool:
    """aiohttp names itself in a Server header; the edge sends none."""
    return "aiohttp" in (resp.header("Server") or "")


RowsWaiter = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def wait_rows(gateway_rows: Callable[..., list[dict[str, Any]]], wait_until: Callable[..., None]) -> RowsWaiter:
    """`wait_rows(gw, n, timeout_s=10)` -> the request records, once there are at least `n`."""

    def wait(gw: BackgroundGateway, n: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal rows
            rows = gateway_rows(gw)
            return len(rows) >= n

        wait_until(enough, timeout_s, f"{n} request records")
        return rows

    return wait


@pytest.fixture
def edge_gw(make_gateway: Callable[..., BackgroundGateway]) -> BackgroundGateway:
    gw = make_gateway(default_config())
    assert gw.server is not None and gw.server.edge is not None, "the edge is on by default"
    return gw


def port_of(gw: BackgroundGateway) -> int:
    assert gw.server is not None
    return gw.server.port


@pytest.fixture
def slow_gw(make_gateway: Callable[..., BackgroundGateway]) -> BackgroundGateway:
    """Streamed tokens 50 ms apart (and unary answers as long as their tokens)."""
    return make_gateway(edge_config(slow=True))


# -- keep-alive and pipelining ------------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        ids = []
        first = c.send(chat(tokens=3)).read_response()
        assert_chat_ok(first, tokens=3)
        assert first.header("Connection") is None and first.header("Server") is None  # the edge's own answer
        ids.append(first.header("x-request-id"))

        stream = c.send(chat(stream=True, tokens=4)).read_response()
        assert_stream_ok(stream, tokens=4)
        assert stream.raw_body.endswith(b"0\r\n\r\n") and stream.header("Content-Length") is None
        ids.append(stream.header("x-request-id"))

        again = c.send(chat("chat-b", tokens=5, path="/chat/completions")).read_response()
        assert_chat_ok(again, tokens=5, model="chat-b")
        ids.append(again.header("x-request-id"))

        stream2 = c.send(chat(stream=True, tokens=2, fields={"stream_options": {"include_usage": True}})).read_response()
        chunks = assert_stream_ok(stream2, tokens=2)
        assert chunks[-1]["usage"]["completion_tokens"] == 2
        ids.append(stream2.header("x-request-id"))

        emb = c.send(request("POST", "/v1/embeddings", orjson.dumps({"model": "embed", "input": ["a", "b"]}))).read_response()
        assert emb.status == 200 and emb.framing == "length"
        assert_common_headers(emb)
        assert [d["index"] for d in emb.json()["data"]] == [0, 1]
        ids.append(emb.header("x-request-id"))

        models = c.send(get("/v1/models")).read_response()
        assert models.status == 200 and models.framing == "length" and models.header("Date")
        assert [m["id"] for m in models.json()["data"]] == ["chat-a", "chat-b", "embed"]
        one = c.send(get("/models/chat-b")).read_response()
        assert one.status == 200 and one.json()["id"] == "chat-b"

        assert len(set(ids)) == len(ids), ids  # a fresh request id each time
        c.assert_open()  # every answer was framed exactly: nothing left over, connection kept


def test_pipelined_requests_are_answered_in_order(slow_gw: BackgroundGateway, wait_rows: RowsWaiter) -> None:
    tokens = [6, 1, 3]  # the first takes longest: its answer must still come first
    with Conn(port_of(slow_gw)) as c:
        c.send(b"".join(chat(tokens=n) for n in tokens))
        answers = [c.read_response() for _ in tokens]
        for resp, n in zip(answers, tokens):
            assert_chat_ok(resp, tokens=n)
        c.assert_open()
    ids = [a.header("x-request-id") for a in answers]
    rows = wait_rows(slow_gw, 3)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == set(ids)
    assert [by_id[i]["completion_tokens"] for i in ids] == tokens
    assert sorted(ids) == ids  # request ids are time-ordered: served one after the other, in order


def test_pipelining_past_the_queue_limit(make_gateway: Callable[..., BackgroundGateway]) -> None:
    """40 pipelined requests of 3 KB each (more than the edge parses ahead): all answered, in order."""
    gw = make_gateway(default_config())
    n = 40
    pad = "x" * 3000
    data = b"".join(
        request("POST", "/v1/chat/completions",
                orjson.dumps({"model": "chat-a", "messages": [{"role": "user", "content": pad}], "sim_output_tokens": i + 1}))
        for i in range(n)
    )
    with Conn(port_of(gw)) as c:
        c.send(data)
        got = [assert_chat_ok(c.read_response())["usage"]["completion_tokens"] for _ in range(n)]
        assert got == list(range(1, n + 1))
        assert_chat_ok(c.send(chat(tokens=2)).read_response(), tokens=2)  # reading resumed


def test_query_string_on_api_paths(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(chat(tokens=2, path="/v1/chat/completions?x=1&y=%20")).read_response()
        assert_chat_ok(resp, tokens=2)
        assert not served_by_aiohttp(resp)
        models = c.send(get("/v1/models?limit=5")).read_response()
        assert models.status == 200 and not served_by_aiohttp(models)
        assert len(models.json()["data"]) == 3


# -- hand-over to aiohttp -----------------------------------------------------------------------


def _assert_health(resp: Response) -> None:
    assert resp.status == 200
    assert served_by_aiohttp(resp)
    assert (resp.header("Content-Type") or "").startswith("application/json")
    doc = resp.json()
    assert doc["status"] == "ok" and set(doc) == {"status", "spool_pending_bytes", "log_store_ok", "log_lag_s"}


def test_hand_over_to_aiohttp_mid_connection(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        first = c.send(chat(tokens=3)).read_response()
        assert_chat_ok(first, tokens=3)
        assert not served_by_aiohttp(first)
        _assert_health(c.send(get("/health")).read_response())
        last = c.send(chat(tokens=4)).read_response()
        assert_chat_ok(last, tokens=4)
        assert served_by_aiohttp(last)  # the connection is aiohttp's from the hand-over on
        stream = c.send(chat(stream=True, tokens=3)).read_response()
        assert_stream_ok(stream, tokens=3)
        assert served_by_aiohttp(stream)
        c.assert_open()


def test_hand_over_with_pipelined_requests(slow_gw: BackgroundGateway) -> None:
    with Conn(port_of(slow_gw)) as c:
        # the first (slow) chat is the edge's; /health and the last chat wait for it, then go to aiohttp
        c.send(chat(tokens=6) + get("/health") + chat(tokens=2) + chat(stream=True, tokens=2))
        first = c.read_response()
        assert_chat_ok(first, tokens=6)
        assert not served_by_aiohttp(first)
        _assert_health(c.read_response())
        last = c.read_response()
        assert_chat_ok(last, tokens=2)
        assert served_by_aiohttp(last)
        assert_stream_ok(c.read_response(), tokens=2)
        c.assert_open()


def test_hand_over_carries_bodies_and_headers(edge_gw: BackgroundGateway, keys: Any) -> None:
    """A request aiohttp serves after the hand-over gets its body (sent chunked here) and headers."""
    with Conn(port_of(edge_gw)) as c:
        _assert_health(c.send(get("/health")).read_response())
        body = orjson.dumps({"name": "via-edge", "models": ["chat-a"]})
        created = c.send(
            request("POST", "/admin/keys", None, key=keys.master, headers={"Transfer-Encoding": "chunked"}) + chunked(body, 5)
        ).read_response()
        assert created.status == 201, created.body
        assert created.json()["name"] == "via-edge"
        listed = c.send(get("/admin/keys", key=keys.master)).read_response()
        assert listed.status == 200 and "via-edge" in listed.body.decode()
        denied = c.send(get("/admin/keys", key=keys.all)).read_response()
        assert denied.status in (401, 403)


def _normalised(resp: Response) -> tuple[int, str, Any, bool]:
    doc = resp.json()
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k not in ("id", "created")}
    return resp.status, (resp.header("Content-Type") or "").split(";")[0], doc, resp.header("x-request-id") is not None


PARITY_CASES: list[tuple[str, bytes]] = [
    ("models", get("/v1/models")),
    ("models_unprefixed", get("/models")),
    ("models_limited_key", get("/v1/models", key="sk-test-limited-0123456789ab")),
    ("model", get("/v1/models/chat-a")),
    ("model_unprefixed", get("/models/embed")),
    ("model_unknown", get("/v1/models/nope")),
    ("model_percent_encoded", get("/v1/models/chat%2Da")),
    ("model_encoded_slash", get("/v1/models/chat%2Fa")),
    ("model_not_allowed", get("/v1/models/chat-b", key="sk-test-limited-0123456789ab")),
    ("model_trailing_slash", get("/v1/models/")),
    ("model_sub_path", get("/v1/models/chat-a/extra")),
    ("models_missing_key", get("/v1/models", key=None)),
    ("models_wrong_key", get("/v1/models", key="sk-wrong-key-0123456789abcdef")),
    ("chat", chat(tokens=4)),
    ("chat_unprefixed", chat("chat-b", tokens=2, path="/chat/completions")),
    ("chat_invalid_json", request("POST", "/v1/chat/completions", b'{"model": "chat-a", "messages": [')),
    ("chat_missing_key", chat(key=None)),
    ("chat_wrong_key", chat(key="sk-wrong-key-0123456789abcdef")),
    ("chat_unknown_model", chat("no-such-model")),
    ("chat_model_not_allowed", chat("chat-b", key="sk-test-limited-0123456789ab")),
    ("embeddings", request("POST", "/v1/embeddings", orjson.dumps({"model": "embed", "input": "x"}))),
    ("embeddings_wrong_kind", request("POST", "/embeddings", orjson.dumps({"model": "chat-a", "input": "x"}))),
    ("get_chat_405", get("/v1/chat/completions")),
    ("delete_models_405", request("DELETE", "/v1/models")),
    ("post_unknown_404", request("POST", "/v1/unknown", b"{}")),
    ("get_unknown_404", get("/nothing/here")),
]


@pytest.fixture
def edge_and_aiohttp(make_gateway: Callable[..., BackgroundGateway]) -> tuple[BackgroundGateway, BackgroundGateway]:
    edge, plain = make_gateway(edge_config(edge=True)), make_gateway(edge_config(edge=False))
    assert edge.server is not None and edge.server.edge is not None
    assert plain.server is not None and plain.server.edge is None
    return edge, plain


def test_edge_answers_like_aiohttp(edge_and_aiohttp: tuple[BackgroundGateway, BackgroundGateway]) -> None:
    """Same status, content type and JSON body (ids and timestamps aside) with the edge on and off.
    (Run in the same order on both, so the simulated provider draws the same answers.)"""
    edge, plain = edge_and_aiohttp
    seen_statuses = set()
    for name, data in PARITY_CASES:
        on, off = exchange(port_of(edge), data), exchange(port_of(plain), data)
        assert served_by_aiohttp(off)
        assert _normalised(on) == _normalised(off), name
        seen_statuses.add(on.status)
        if on.status >= 400:
            assert_openai_error(on, on.status)
    assert seen_statuses == {200, 400, 401, 403, 404, 405}  # the cases cover successes and each kind of error


def test_parity_cases_exercise_the_expected_answers(edge_gw: BackgroundGateway) -> None:
    """Pin a few of the parity answers, so the comparison above cannot pass on two equal mistakes."""
    port = port_of(edge_gw)
    assert exchange(port, get("/v1/models/chat%2Da")).json()["id"] == "chat-a"
    assert_openai_error(exchange(port, get("/v1/models/nope")), 404, "model_not_found")
    assert_openai_error(exchange(port, chat(key=None)), 401, "invalid_api_key")
    assert_openai_error(exchange(port, chat(key="sk-wrong-key-0123456789abcdef")), 401, "invalid_api_key")
    assert_openai_error(exchange(port, chat("no-such-model")), 404, "model_not_found")
    assert_openai_error(exchange(port, request("POST", "/v1/chat/completions", b"{nope")), 400, "invalid_request")
    assert_openai_error(exchange(port, get("/v1/chat/completions")), 405)
    assert_openai_error(exchange(port, request("POST", "/v1/unknown", b"{}")), 404)


# -- closing: Connection: close and HTTP/1.0 ----------------------------------------------------


def test_connection_close_from_the_client(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        # the pipelined request after the `close` one is never answered
        c.send(chat(tokens=2, headers={"Connection": "close"}) + chat(tokens=3))
        resp = c.read_response()
        assert_chat_ok(resp, tokens=2)
        assert resp.header("Connection") == "close"
        c.assert_closed()


def test_connection_close_on_a_stream(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(chat(stream=True, tokens=3, headers={"Connection": "close"})).read_response()
        assert_stream_ok(resp, tokens=3)
        assert resp.header("Connection") == "close"
        c.assert_closed()


def test_http10_request_is_answered_with_a_length_and_closed(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(chat(tokens=3, version="1.0")).read_response()
        assert_chat_ok(resp, tokens=3)  # framed by Content-Length
        assert resp.header("Connection") == "close"
        c.assert_closed()
    with Conn(port_of(edge_gw)) as c:
        models = c.send(get("/v1/models", version="1.0")).read_response()
        assert models.status == 200 and models.framing == "length"
        c.assert_closed()


def test_http10_stream_is_not_chunked_and_ends_with_the_close(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(chat(stream=True, tokens=4, version="1.0")).read_response()
        assert resp.header("Transfer-Encoding") is None and resp.header("Content-Length") is None
        assert_stream_ok(resp, tokens=4, framing="close")  # read until the server closed
        assert resp.header("Connection") == "close"
        assert b"\r\n0\r\n" not in resp.raw_body  # no chunk framing inside the events


def test_http10_keep_alive_stream_still_closes(edge_gw: BackgroundGateway) -> None:
    """An HTTP/1.0 client asking for keep-alive: a unary answer keeps the connection; a stream
    (no chunked coding in 1.0) can only end with the close."""
    with Conn(port_of(edge_gw)) as c:
        assert_chat_ok(c.send(chat(tokens=2, version="1.0", headers={"Connection": "keep-alive"})).read_response(), tokens=2)
        c.assert_open()
        resp = c.send(chat(stream=True, tokens=2, version="1.0", headers={"Connection": "keep-alive"})).read_response()
        assert_stream_ok(resp, tokens=2, framing="close")


# -- request bodies -----------------------------------------------------------------------------


def test_chunked_request_body(edge_gw: BackgroundGateway) -> None:
    body = chat_body(tokens=3)
    with Conn(port_of(edge_gw)) as c:
        c.send(request("POST", "/v1/chat/completions", None, headers={"Transfer-Encoding": "chunked"}) + chunked(body))
        assert_chat_ok(c.read_response(), tokens=3)
        # the connection is reusable after a chunked body; a stream with a chunked body too
        c.send(request("POST", "/v1/chat/completions", None, headers={"Transfer-Encoding": "chunked"})
               + chunked(chat_body(stream=True, tokens=2), 3))
        assert_stream_ok(c.read_response(), tokens=2)
        c.assert_open()


def test_body_arriving_in_pieces(slow_gw: BackgroundGateway) -> None:
    body = chat_body(tokens=2)
    with Conn(port_of(slow_gw)) as c:
        c.send(request("POST", "/v1/chat/completions", None, headers={"Content-Length": str(len(body))}))
        for i in range(0, len(body), 20):
            time.sleep(0.01)
            c.send(body[i:i + 20])
        assert_chat_ok(c.read_response(), tokens=2)


def test_expect_100_continue(edge_gw: BackgroundGateway) -> None:
    body = chat_body(tokens=3)
    with Conn(port_of(edge_gw)) as c:
        c.send(request("POST", "/v1/chat/completions", None,
                       headers={"Content-Length": str(len(body)), "Expect": "100-continue"}))
        interim = c.read_response()
        assert (interim.status, interim.version) == (100, "HTTP/1.1")
        assert c.buf == b""  # nothing but the 100 before the body is sent
        c.send(body)
        assert_chat_ok(c.read_response(), tokens=3)
        c.assert_open()


def test_expect_100_continue_with_a_body_too_large_is_refused_at_once(make_gateway: Callable[..., BackgroundGateway]) -> None:
    gw = make_gateway(edge_config(max_body_bytes=4096))
    with Conn(port_of(gw)) as c:
        c.send(request("POST", "/v1/chat/completions", None, headers={"Content-Length": "5000", "Expect": "100-continue"}))
        resp = c.read_response()  # a final answer, not a 100 Continue
        assert_openai_error(resp, 413, "payload_too_large")
        assert resp.header("Connection") == "close"
        c.assert_closed()


def _body_of_length(n: int) -> bytes:
    """A valid chat body of exactly `n` bytes."""
    base = chat_body(tokens=2, user="")
    body = chat_body(tokens=2, user="u" * (n - len(base)))
    assert len(body) == n
    return body


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_limit(make_gateway: Callable[..., BackgroundGateway], framing: str) -> None:
    gw = make_gateway(edge_config(max_body_bytes=4096))

    def send(c: Conn, body: bytes) -> Response:
        if framing == "length":
            return c.send(request("POST", "/v1/chat/completions", body)).read_response()
        head = request("POST", "/v1/chat/completions", None, headers={"Transfer-Encoding": "chunked"})
        return c.send(head + chunked(body, 1000)).read_response()

    with Conn(port_of(gw)) as c:
        assert_chat_ok(send(c, _body_of_length(4096)), tokens=2)  # at the limit: served, connection kept
        resp = send(c, _body_of_length(4097))
        assert_openai_error(resp, 413, "payload_too_large")
        assert resp.header("Connection") == "close"
        c.assert_closed()
    with Conn(port_of(gw)) as c:  # far over the limit
        assert_openai_error(send(c, b"x" * 20000), 413, "payload_too_large")
        c.assert_closed()


# -- malformed requests -------------------------------------------------------------------------


def test_request_head_over_64kb_is_431(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(get("/v1/models", headers={"X-Big": "a" * 70_000})).read_response()
        assert_openai_error(resp, 431, "request_headers_too_large")
        assert resp.header("Connection") == "close"
        c.assert_closed()
    with Conn(port_of(edge_gw)) as c:  # a long target counts too
        resp = c.send(get("/v1/models?q=" + "a" * 70_000)).read_response()
        assert_openai_error(resp, 431, "request_headers_too_large")
        c.assert_closed()
    with Conn(port_of(edge_gw)) as c:  # under the cap: fine
        resp = c.send(get("/v1/models", headers={"X-Big": "a" * 60_000})).read_response()
        assert resp.status == 200


def test_malformed_request_is_400_and_closed(edge_gw: BackgroundGateway) -> None:
    with Conn(port_of(edge_gw)) as c:
        resp = c.send(b"GARBAGE\r\n\r\n").read_response()
        assert_openai_error(resp, 400, "invalid_request")
        assert resp.header("Connection") == "close"
        c.assert_closed()


def test_garbage_after_a_pipelined_request_is_answered_in_turn(slow_gw: BackgroundGateway) -> None:
    with Conn(port_of(slow_gw)) as c:
        c.send(chat(tokens=4) + b"GARBAGE\r\n\r\n")
        assert_chat_ok(c.read_response(), tokens=4)
        assert_openai_error(c.read_response(), 400, "invalid_request")
        c.assert_closed()


# -- idle timeout -------------------------------------------------------------------------------


def test_idle_keep_alive_connection_is_closed(make_gateway: Callable[..., BackgroundGateway]) -> None:
    gw = make_gateway(edge_config(keepalive_timeout_s=0.3))
    with Conn(port_of(gw)) as c:
        assert_chat_ok(c.send(chat(tokens=2)).read_response(), tokens=2)
        answered = time.monotonic()
        c.assert_closed(timeout_s=5)
        assert 0.25 <= time.monotonic() - answered < 3, "closed after the keep-alive timeout, not before"
    with Conn(port_of(gw)) as c:  # a connection handed to aiohttp: aiohttp's own keep-alive timeout
        _assert_health(c.send(get("/health")).read_response())
        c.assert_closed(timeout_s=5)
    with Conn(port_of(gw)) as c:  # connected, never sent anything
        c.assert_closed(timeout_s=5)


def test_slow_stream_is_not_closed_by_the_idle_sweep(make_gateway: Callable[..., BackgroundGateway]) -> None:
    gw = make_gateway(edge_config(slow=True, keepalive_timeout_s=0.3))
    with Conn(port_of(gw)) as c:
        started = time.monotonic()
        resp = c.send(chat(stream=True, tokens=20)).read_response()  # 20 tokens 50 ms apart: ~1 s
        assert time.monotonic() - started > 0.9  # several sweeps ran meanwhile
        assert_stream_ok(resp, tokens=20)
        # a slow unary answer is not idle either
        assert_chat_ok(c.send(chat(tokens=12)).read_response(), tokens=12)
        c.assert_closed(timeout_s=5)  # idle now: closed


# -- client disconnects -------------------------------------------------------------------------


def test_client_leaving_mid_stream_is_recorded_as_499(slow_gw: BackgroundGateway, wait_rows: RowsWaiter) -> None:
    with Conn(port_of(slow_gw)) as c:
        c.send(chat(stream=True, tokens=100))  # ~5 s of stream
        head = c.read_response(head_only=True)
        assert head.status == 200 and head.header("Transfer-Encoding") == "chunked"
        assert c.read_event().startswith(b"data: ")
        request_id = head.header("x-request-id")
    left = time.monotonic()
    rows = wait_rows(slow_gw, 1, timeout_s=3)  # well before the stream would end
    assert time.monotonic() - left < 3
    assert len(rows) == 1
    row = rows[0]
    assert row["id"] == request_id
    assert (row["status"], row["error_code"], row["is_stream"]) == (499, "client_disconnected", 1)
    assert row["completion_tokens"] < 100


def test_client_leaving_before_its_body_arrives(slow_gw: BackgroundGateway, wait_rows: RowsWaiter) -> None:
    """Headers sent, body promised but never sent: the request is recorded as 499 when the client leaves."""
    with Conn(port_of(slow_gw)) as c:
        c.send(request("POST", "/v1/chat/completions", None, headers={"Content-Length": "100"}) + b'{"model"')
        c.assert_open(0.1)
    rows = wait_rows(slow_gw, 1, timeout_s=5)
    assert [(r["status"], r["error_code"]) for r in rows] == [(499, "client_disconnected")]


# -- shutdown -----------------------------------------------------------------------------------


def test_shutdown_finishes_streams_and_closes_idle_connections(
    tmp_path: Path, read_rows: Callable[..., list[dict[str, Any]]]
) -> None:
    cfg = edge_config(slow=True)
    cfg["data_dir"] = str(tmp_path / "gw")
    gw = BackgroundGateway(compile_config(parse_config(cfg, env={})))
    gw.__enter__()  # stopped by the test itself
    stopper: threading.Thread | None = None
    try:
        port = port_of(gw)
        with Conn(port) as streaming, Conn(port) as idle:
            assert_chat_ok(idle.send(chat(tokens=1)).read_response(), tokens=1)  # kept alive, idle
            streaming.send(chat(stream=True, tokens=30))  # ~1.5 s
            head = streaming.read_response(head_only=True)
            assert head.status == 200
            events = [streaming.read_event()]

            stopper = threading.Thread(target=gw.__exit__, args=(None, None, None), name="stop-gateway")
            stopper.start()
            idle.assert_closed(timeout_s=5)  # closed by the shutdown at once
            with pytest.raises(ConnectionRefusedError):  # and nobody listens any more
                socket.create_connection(("127.0.0.1", port), timeout=2).close()

            while (data := streaming.read_event()) != b"":  # the stream goes on to its end
                events.append(data)
            assert b"".join(events).endswith(DONE)
            tokens = sum(1 for e in sse_events(b"".join(events).decode())
                         if e != "[DONE]" and (ch := json.loads(e)["choices"]) and ch[0]["delta"].get("content"))
            assert tokens == 30
            streaming.assert_closed(timeout_s=5)  # then the connection is closed
        stopper.join(timeout=30)
        assert not stopper.is_alive(), "shutdown did not finish"
    finally:
        if stopper is None:
            gw.__exit__(None, None, None)
    rows = read_rows(tmp_path / "gw" / "requests.db")
    assert sorted((r["is_stream"], r["status"]) for r in rows) == [(0, 200), (1, 200)]


# -- the official SDK ---------------------------------------------------------------------------


def test_openai_sdk_against_the_edge(edge_gw: BackgroundGateway, make_client: Callable[..., openai.OpenAI]) -> None:
    client = make_client(edge_gw.base_url)
    done = client.chat.completions.create(model="chat-a", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
    assert done.choices[0].message.content and done.usage is not None and done.usage.completion_tokens == 3

    chunks = list(client.chat.completions.create(
        model="chat-b", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, max_tokens=4,  # type: ignore[arg-type]
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 4

    emb = client.embeddings.create(model="embed", input=["one", "two"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 64

    assert [m.id for m in client.models.list()] == ["chat-a", "chat-b", "embed"]
    assert client.models.retrieve("chat-a").id == "chat-a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# -- corners of the hand-over, each against both servers (aiohttp alone is the reference) ---------
# (Each failed on the first version of the edge; the reason says how.)


def _both(reason: str) -> list[Any]:
    return [pytest.param(True, id="edge"), pytest.param(False, id="aiohttp")]


@pytest.mark.parametrize("edge", _both(
    "a request the edge forwards to aiohttp is passed on only once its whole body is parsed, so an "
    "`Expect: 100-continue` client (which waits for the 100 before sending the body) never gets one"
))
def test_expect_100_continue_on_a_request_served_by_aiohttp(
    make_gateway: Callable[..., BackgroundGateway], keys: Any, edge: bool
) -> None:
    gw = make_gateway(edge_config(edge=edge))
    body = orjson.dumps({"name": "expecting"})
    with Conn(port_of(gw), timeout_s=3) as c:
        c.send(request("POST", "/admin/keys", None, key=keys.master,
                       headers={"Content-Length": str(len(body)), "Expect": "100-continue", "Content-Type": "application/json"}))
        assert c.read_response().status == 100
        c.send(body)
        assert c.read_response().status == 201


@pytest.mark.parametrize("edge", _both(
    "an upgrade request queued behind an API call sets `_is_raw` before the fallback protocol exists; "
    "the next bytes hit `assert self._fallback is not None` in `data_received` and the connection is "
    "dropped with the API answer"
))
def test_upgrade_request_pipelined_behind_an_api_call(make_gateway: Callable[..., BackgroundGateway], edge: bool) -> None:
    gw = make_gateway(edge_config(edge=edge, slow=True))
    with Conn(port_of(gw), timeout_s=5) as c:
        c.send(chat(tokens=10) + get("/health", headers={"Connection": "Upgrade", "Upgrade": "something"}))
        time.sleep(0.1)  # the chat (~0.5 s) is still being answered when more bytes arrive
        c.send(b"more bytes")
        assert_chat_ok(c.read_response(), tokens=10)
        assert c.read_response().status == 200


@pytest.mark.parametrize("edge", _both(
    "on a connection handed to aiohttp, unparsable bytes make the edge close the transport at once "
    "(`_fail`), dropping aiohttp's answer to the valid request sent before them (which still runs)"
))
def test_garbage_after_a_request_served_by_aiohttp(make_gateway: Callable[..., BackgroundGateway], edge: bool) -> None:
    gw = make_gateway(edge_config(edge=edge, slow=True))
    with Conn(port_of(gw), timeout_s=5) as c:
        _assert_health(c.send(get("/health")).read_response())
        c.send(chat(tokens=5))  # ~0.25 s to answer
        time.sleep(0.05)  # a separate read (in one read, aiohttp's own parser rejects the whole buffer)
        c.send(b"GARBAGE\r\n\r\n")
        assert_chat_ok(c.read_response(), tokens=5)
        assert c.read_response().status == 400


def test_garbage_behind_a_pending_hand_over(slow_gw: BackgroundGateway, wait_rows: RowsWaiter) -> None:
    """API call, then a request for aiohttp, then unparsable bytes in one send: each request is
    answered in order, then the garbage gets a 400 and the connection closes. (The first edge closed
    at once: the API call, recorded as 200, never reached the client.)"""
    with Conn(port_of(slow_gw), timeout_s=5) as c:
        c.send(chat(tokens=4) + get("/health") + b"GARBAGE\r\n\r\n")
        try:
            delivered = c.read_response()
        finally:
            assert [r["status"] for r in wait_rows(slow_gw, 1)] == [200]  # recorded as answered
        assert_chat_ok(delivered, tokens=4)
        health = c.read_response()
        assert health.status == 200 and orjson.loads(health.body)["status"] == "ok"
        assert c.read_response().status == 400
        c.assert_closed()


@pytest.mark.parametrize("edge", _both(
    "a request for aiohttp is buffered whole by the edge before it is forwarded, with no size limit: "
    "a declared 100 MB body is answered only after all of it arrived (aiohttp answers the 404 at once)"
))
def test_request_for_aiohttp_with_a_large_body_is_answered_without_buffering_it(
    make_gateway: Callable[..., BackgroundGateway], edge: bool
) -> None:
    gw = make_gateway(edge_config(edge=edge, max_body_bytes=4096))
    with Conn(port_of(gw), timeout_s=3) as c:
        c.send(request("POST", "/v1/unknown", None, headers={"Content-Length": str(100 * 1024 * 1024)}) + b"x" * 1024)
        assert_openai_error(c.read_response(), 404)


@pytest.mark.parametrize("edge", _both(
    "an HTTP/1.0 client that asks for keep-alive gets a kept-alive connection but no "
    "`Connection: keep-alive` in the answer, so it cannot know the connection is persistent"
))
def test_http10_keep_alive_is_acknowledged(make_gateway: Callable[..., BackgroundGateway], edge: bool) -> None:
    gw = make_gateway(edge_config(edge=edge))
    with Conn(port_of(gw)) as c:
        resp = c.send(chat(tokens=2, version="1.0", headers={"Connection": "keep-alive"})).read_response()
        assert_chat_ok(resp, tokens=2)
        assert (resp.header("Connection") or "").lower() == "keep-alive"
        c.assert_open()

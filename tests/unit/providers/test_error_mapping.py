"""Upstream HTTP status / transport failures -> the setpoint error tree."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from setpoint.errors import (
    InvalidRequestError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    UpstreamError,
)
from setpoint.providers.base import error_from_status, parse_retry_after
from setpoint.providers.openai_compatible import map_upstream_errors


def openai_error(message: str, code: str | None, etype: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


# -- parse_retry_after --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": "-4"}, 0.0),  # never negative
        ({"x-ratelimit-reset-requests": "1s"}, 1.0),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "1m"}, 60.0),
        ({"x-ratelimit-reset-requests": "2.5s"}, 2.5),
        ({"x-ratelimit-reset-requests": " 7 "}, 7.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "9s"}, 1.0),
        ({"Retry-After": "2", "x-ratelimit-reset-requests": "30s"}, 2.0),  # Retry-After wins
        ({}, None),
        ({"x-ratelimit-reset-requests": "soon"}, None),
        ({"Retry-After": "later"}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    got = parse_retry_after(headers)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


def test_parse_retry_after_case_insensitive_multidict() -> None:
    # What aiohttp hands the adapter: a case-insensitive multidict.
    h = CIMultiDictProxy(CIMultiDict({"RETRY-AFTER": "4", "X-RateLimit-Reset-Requests": "1s"}))
    assert parse_retry_after(h) == 4.0
    h2 = CIMultiDictProxy(CIMultiDict({"X-RateLimit-Reset-Requests": "20ms"}))
    assert parse_retry_after(h2) == pytest.approx(0.02)


@pytest.mark.parametrize(("value", "seconds"), [("6m0s", 360.0), ("1m30s", 90.0), ("1h2m", 3720.0)])
def test_parse_retry_after_compound_durations(value: str, seconds: float) -> None:
    assert parse_retry_after({"x-ratelimit-reset-tokens": value}) == pytest.approx(seconds)


# -- error_from_status --------------------------------------------------------------------------


def test_429_with_retry_after_seconds() -> None:
    err = error_from_status("openai", 429, {"Retry-After": "7"}, openai_error("Rate limit reached", "rate_limit_exceeded"))
    assert type(err) is ProviderRateLimitedError
    assert err.retry_after_s == 7.0
    assert err.status == 429 and err.is_retryable
    assert err.headers() == {"Retry-After": "7"}
    assert "openai" in err.message and "Rate limit reached" in err.message


@pytest.mark.parametrize(("value", "seconds", "header"), [("1s", 1.0, "1"), ("20ms", 0.02, "1"), ("1m", 60.0, "60"), ("1.5s", 1.5, "2")])
def test_429_with_x_ratelimit_reset_requests(value: str, seconds: float, header: str) -> None:
    err = error_from_status("openai", 429, {"x-ratelimit-reset-requests": value}, b"")
    assert isinstance(err, ProviderRateLimitedError)
    assert err.retry_after_s == pytest.approx(seconds)
    assert err.headers() == {"Retry-After": header}


def test_429_without_hint() -> None:
    err = error_from_status("p", 429, {}, b"<html>slow down</html>")
    assert isinstance(err, ProviderRateLimitedError)
    assert err.retry_after_s is None
    assert err.headers() == {}
    assert "too many requests" in err.message


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_credential_failure_is_never_the_clients_401(status: int) -> None:
    body = openai_error("Incorrect API key provided: sk-proj-abc***", "invalid_api_key", "authentication_error")
    err = error_from_status("openai", status, {}, body)
    assert type(err) is ProviderResponseError
    assert err.status == 502
    assert err.wire_code == "bad_upstream_response"
    assert err.type == "upstream_error"
    assert f"HTTP {status}" in err.message
    assert "sk-proj" not in err.message  # the upstream's message (which may echo a key) is not relayed


def test_408_is_a_timeout() -> None:
    err = error_from_status("p", 408, {}, b"")
    assert type(err) is ProviderTimeoutError
    assert err.status == 504 and err.is_retryable


def test_504_is_a_timeout() -> None:
    err = error_from_status("p", 504, {}, b"")
    assert type(err) is ProviderTimeoutError
    assert err.status == 504 and err.is_retryable


@pytest.mark.parametrize("status", [500, 502, 503, 529])
def test_5xx_is_unavailable_with_upstream_status(status: int) -> None:
    err = error_from_status("p", status, {}, openai_error("The server had an error", None, "server_error"))
    assert type(err) is ProviderUnavailableError
    assert err.status == 503
    assert err.upstream_status == status
    assert err.is_retryable
    assert f"HTTP {status}" in err.message and "The server had an error" in err.message


def test_400_relays_openai_message_and_code() -> None:
    body = openai_error("This model's maximum context length is 128000 tokens.", "context_length_exceeded")
    err = error_from_status("openai", 400, {}, body)
    assert type(err) is ProviderRejectedError
    assert err.status == 400
    assert err.wire_code == "context_length_exceeded"
    assert err.upstream_code == "context_length_exceeded"
    assert "maximum context length is 128000" in err.message
    assert not err.is_retryable


@pytest.mark.parametrize("status", [404, 409, 413, 422])
def test_other_4xx_relayed_with_their_status(status: int) -> None:
    err = error_from_status("p", status, {}, openai_error("nope", None))
    assert isinstance(err, ProviderRejectedError)
    assert err.status == status
    assert err.wire_code == "upstream_rejected"  # no upstream code -> our code


@pytest.mark.parametrize(
    "body",
    [b"", b"<html><body>Bad Request</body></html>", b"\xff\xfe\x00", b"[1,2]", b'{"error": 5}',
     b'{"message": "not nested"}', b'{"error": {"message": 3, "code": 4}}'],
)
def test_400_with_non_json_or_odd_body(body: bytes) -> None:
    err = error_from_status("p", 400, {}, body)
    assert isinstance(err, ProviderRejectedError)
    assert err.status == 400
    assert err.wire_code == "upstream_rejected"
    assert "HTTP 400" in err.message


def test_400_with_plain_string_error() -> None:
    err = error_from_status("vllm", 400, {}, b'{"error": "prompt too long"}')
    assert isinstance(err, ProviderRejectedError)
    assert "prompt too long" in err.message
    assert err.upstream_code is None


@pytest.mark.parametrize("body", [b"", b"Internal Server Error", b"\x00\x01"])
def test_5xx_with_non_json_body(body: bytes) -> None:
    err = error_from_status("p", 502, {}, body)
    assert isinstance(err, ProviderUnavailableError)
    assert "no details" in err.message


@pytest.mark.parametrize("status", [100, 204, 301, 304])
def test_unexpected_status_is_a_bad_response(status: int) -> None:
    err = error_from_status("p", status, {}, b"")
    assert type(err) is ProviderResponseError
    assert err.status == 502


def test_every_mapping_is_an_upstream_error() -> None:
    for status in range(300, 600):
        err = error_from_status("p", status, {}, b"{}")
        assert isinstance(err, UpstreamError), status
        assert not isinstance(err, InvalidRequestError)
        assert err.status != 401


# -- map_upstream_errors (aiohttp adapter) ------------------------------------------------------


def _request_info() -> aiohttp.RequestInfo:
    url = URL("http://upstream.invalid/v1/chat/completions")
    return aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)


def _conn_key() -> object:
    from aiohttp.client_reqrep import ConnectionKey

    return ConnectionKey("upstream.invalid", 443, True, True, None, None, None)


TRANSPORT_CASES: list[tuple[str, BaseException, type[UpstreamError]]] = [
    ("asyncio timeout", asyncio.TimeoutError(), ProviderTimeoutError),
    ("builtin timeout", TimeoutError(), ProviderTimeoutError),
    ("server timeout", aiohttp.ServerTimeoutError("Timeout on reading data from socket"), ProviderTimeoutError),
    ("connection timeout", aiohttp.ConnectionTimeoutError("Connection timeout"), ProviderTimeoutError),
    ("socket timeout", aiohttp.SocketTimeoutError("Timeout on reading data from socket"), ProviderTimeoutError),
    ("payload error", aiohttp.ClientPayloadError("Response payload is not completed"), ProviderResponseError),
    ("response error", aiohttp.ClientResponseError(_request_info(), (), status=200, message="bad"), ProviderResponseError),
    ("content type", aiohttp.ContentTypeError(_request_info(), (), message="unexpected mimetype"), ProviderResponseError),
    ("too many redirects", aiohttp.TooManyRedirects(_request_info(), ()), ProviderResponseError),
    ("server disconnected", aiohttp.ServerDisconnectedError(), ProviderUnavailableError),
    ("connector error", aiohttp.ClientConnectorError(_conn_key(), ConnectionRefusedError(111, "Connection refused")), ProviderUnavailableError),  # type: ignore[arg-type]
    ("client os error", aiohttp.ClientOSError(104, "Connection reset by peer"), ProviderUnavailableError),
    ("connection reset", aiohttp.ClientConnectionResetError("Cannot write to closing transport"), ProviderUnavailableError),
    ("plain OSError", OSError(101, "Network is unreachable"), ProviderUnavailableError),
    ("ConnectionResetError", ConnectionResetError(), ProviderUnavailableError),
    ("generic client error", aiohttp.ClientError("x"), ProviderUnavailableError),
]


@pytest.mark.parametrize(("exc", "mapped"), [c[1:] for c in TRANSPORT_CASES], ids=[c[0] for c in TRANSPORT_CASES])
def test_map_upstream_errors(exc: BaseException, mapped: type[UpstreamError]) -> None:
    with pytest.raises(UpstreamError) as info:
        with map_upstream_errors("openai"):
            raise exc
    assert type(info.value) is mapped
    assert info.value.__cause__ is exc
    assert "openai" in info.value.message


def test_map_upstream_errors_passes_setpoint_errors_through() -> None:
    original = ProviderRejectedError("x", upstream_status=400)
    with pytest.raises(ProviderRejectedError) as info:
        with map_upstream_errors("p"):
            raise original
    assert info.value is original


def test_map_upstream_errors_does_not_swallow_programming_errors() -> None:
    with pytest.raises(KeyError):
        with map_upstream_errors("p"):
            raise KeyError("bug")


def test_map_upstream_errors_quiet_on_success() -> None:
    with map_upstream_errors("p"):
        value = 1
    assert value == 1


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_real_connection_refused_maps_to_unavailable() -> None:
    port = _closed_port()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ProviderUnavailableError) as info:
            with map_upstream_errors("local"):
                async with session.get(f"http://127.0.0.1:{port}/v1/models"):
                    pass
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    assert "ClientConnectorError" in info.value.message


async def test_real_truncated_body_maps_to_bad_response() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\":")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ProviderResponseError) as info:
                with map_upstream_errors("local"):
                    async with session.get(f"http://127.0.0.1:{port}/") as resp:
                        await resp.read()
        assert isinstance(info.value.__cause__, aiohttp.ClientPayloadError)
    finally:
        server.close()
        await server.wait_closed()


async def test_real_read_timeout_maps_to_timeout() -> None:
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()  # never answers in time
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        timeout = aiohttp.ClientTimeout(total=0.2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(ProviderTimeoutError):
                with map_upstream_errors("local"):
                    async with session.get(f"http://127.0.0.1:{port}/") as resp:
                        await resp.read()
    finally:
        release.set()
        server.close()
        await server.wait_closed()

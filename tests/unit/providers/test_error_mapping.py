"""Upstream HTTP status / transport failures -> the setpoint error tree."""

from __future__ import annotations


import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

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
from setpoint.providers.http_pool import BodyError, ConnectError, ProtocolError, TransportError, TransportTimeout
from setpoint.providers.http_session import map_transport_errors


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


# -- map_transport_errors (the HTTP pool's failures) ----------------------------------------------

TRANSPORT_CASES: list[tuple[str, BaseException, type[UpstreamError]]] = [
    ("connect or total timeout", TransportTimeout("timed out"), ProviderTimeoutError),
    ("truncated body", BodyError("the connection closed inside the body"), ProviderResponseError),
    ("invalid HTTP", ProtocolError("invalid HTTP response"), ProviderResponseError),
    ("refused", ConnectError("Connection refused"), ProviderUnavailableError),
    ("closed before a response", ConnectError("the connection closed before a response"), ProviderUnavailableError),
    ("any other transport error", TransportError("x"), ProviderUnavailableError),
]


@pytest.mark.parametrize(("exc", "mapped"), [c[1:] for c in TRANSPORT_CASES], ids=[c[0] for c in TRANSPORT_CASES])
def test_map_transport_errors(exc: BaseException, mapped: type[UpstreamError]) -> None:
    with pytest.raises(UpstreamError) as info:
        with map_transport_errors("openai"):
            raise exc
    assert type(info.value) is mapped
    assert info.value.__cause__ is exc
    assert "openai" in info.value.message


def test_map_transport_errors_passes_setpoint_errors_through() -> None:
    original = ProviderRejectedError("x", upstream_status=400)
    with pytest.raises(ProviderRejectedError) as info:
        with map_transport_errors("p"):
            raise original
    assert info.value is original


def test_map_transport_errors_does_not_swallow_programming_errors() -> None:
    with pytest.raises(KeyError):
        with map_transport_errors("p"):
            raise KeyError("bug")


def test_map_transport_errors_quiet_on_success() -> None:
    with map_transport_errors("p"):
        value = 1
    assert value == 1

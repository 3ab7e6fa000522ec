"""The error tree: every class declares its wire contract, and the hierarchy matches the docs."""

from __future__ import annotations

import inspect
import logging
import re

import pytest

import setpoint.errors as errors_mod
from setpoint.errors import (
    AllCandidatesFailedError,
    AuthenticationError,
    BudgetExceededError,
    CircuitOpenError,
    OverloadedError,
    ConfigError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    PayloadTooLargeError,
    HeadersTooLargeError,
    HttpVersionNotSupportedError,
    PermissionDeniedError,
    ProviderRateLimitedError,
    ProviderRejectedError,
    ProviderResponseError,
    ProviderTimeoutError,
    ProviderUnavailableError,
    RateLimitedError,
    RequestError,
    SetpointError,
    StateBackendError,
    UpstreamError,
)

ALL_CLASSES = [getattr(errors_mod, name) for name in errors_mod.__all__]

# (class, status, code, type, parent, retryable) as the module docstring documents them.
CONTRACT = [
    (InvalidRequestError, 400, "invalid_request", "invalid_request_error", RequestError, False),
    (PayloadTooLargeError, 413, "payload_too_large", "invalid_request_error", RequestError, False),
    (HeadersTooLargeError, 431, "request_headers_too_large", "invalid_request_error", RequestError, False),
    (HttpVersionNotSupportedError, 505, "http_version_not_supported", "invalid_request_error", RequestError, False),
    (AuthenticationError, 401, "invalid_api_key", "authentication_error", RequestError, False),
    (PermissionDeniedError, 403, "permission_denied", "permission_error", RequestError, False),
    (NotFoundError, 404, "not_found", "invalid_request_error", RequestError, False),
    (ModelNotFoundError, 404, "model_not_found", "invalid_request_error", NotFoundError, False),
    (MethodNotAllowedError, 405, "method_not_allowed", "invalid_request_error", RequestError, False),
    (RateLimitedError, 429, "rate_limited", "rate_limit_error", RequestError, False),
    (BudgetExceededError, 429, "budget_exceeded", "insufficient_quota", RateLimitedError, False),
    (ProviderTimeoutError, 504, "upstream_timeout", "upstream_error", UpstreamError, True),
    (ProviderUnavailableError, 503, "upstream_unavailable", "upstream_error", UpstreamError, True),
    (ProviderRateLimitedError, 429, "upstream_rate_limited", "rate_limit_error", UpstreamError, True),
    (ProviderResponseError, 502, "bad_upstream_response", "upstream_error", UpstreamError, False),
    (ProviderRejectedError, 502, "upstream_rejected", "invalid_request_error", UpstreamError, False),
    (CircuitOpenError, 503, "circuit_open", "upstream_error", UpstreamError, True),
    (OverloadedError, 503, "overloaded", "upstream_error", UpstreamError, False),
    (AllCandidatesFailedError, 502, "all_candidates_failed", "upstream_error", UpstreamError, False),
    (InternalError, 500, "internal_error", "server_error", SetpointError, False),
    (StateBackendError, 503, "state_backend_unavailable", "server_error", SetpointError, True),
    (ConfigError, 500, "config_error", "server_error", SetpointError, False),
]


def test_all_names_exist_and_are_setpoint_errors() -> None:
    assert len(errors_mod.__all__) == len(set(errors_mod.__all__))
    for name in errors_mod.__all__:
        cls = getattr(errors_mod, name, None)
        assert cls is not None, f"{name} listed in __all__ but missing"
        assert inspect.isclass(cls) and issubclass(cls, SetpointError), name
        assert cls.__name__ == name


def test_all_lists_every_public_error_class() -> None:
    defined = {
        n for n, obj in vars(errors_mod).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors_mod.__name__
        and not n.startswith("_")
    }
    assert defined == set(errors_mod.__all__)


def test_contract_covers_every_concrete_class() -> None:
    abstract = {SetpointError, RequestError, UpstreamError}
    assert {c[0] for c in CONTRACT} == set(ALL_CLASSES) - abstract


@pytest.mark.parametrize(("cls", "status", "code", "etype", "parent", "retryable"), CONTRACT, ids=[c[0].__name__ for c in CONTRACT])
def test_class_contract(cls: type[SetpointError], status: int, code: str, etype: str, parent: type, retryable: bool) -> None:
    assert cls.status_code == status
    assert cls.code == code
    assert cls.type == etype
    assert issubclass(cls, parent)
    assert cls.is_retryable is retryable


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_every_class_declares_wire_fields(cls: type[SetpointError]) -> None:
    assert isinstance(cls.status_code, int) and 400 <= cls.status_code <= 599
    assert re.fullmatch(r"[a-z][a-z0-9_]*", cls.code), cls.code
    assert re.fullmatch(r"[a-z][a-z_]*", cls.type), cls.type
    assert isinstance(cls.is_retryable, bool)
    assert cls.log_level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def test_codes_of_concrete_classes_are_unique() -> None:
    concrete = [c[0] for c in CONTRACT]
    codes = [c.code for c in concrete]
    assert len(codes) == len(set(codes)), codes


def test_branches() -> None:
    for cls in (InvalidRequestError, PayloadTooLargeError, AuthenticationError, PermissionDeniedError,
                NotFoundError, ModelNotFoundError, MethodNotAllowedError, RateLimitedError, BudgetExceededError):
        assert issubclass(cls, RequestError) and not issubclass(cls, UpstreamError)
        assert 400 <= cls.status_code < 500
    for cls in (ProviderTimeoutError, ProviderUnavailableError, ProviderRateLimitedError, ProviderResponseError,
                ProviderRejectedError, CircuitOpenError, OverloadedError, AllCandidatesFailedError):
        assert issubclass(cls, UpstreamError) and not issubclass(cls, RequestError)
    assert RequestError.log_level == logging.INFO
    assert UpstreamError.log_level == logging.WARNING


def test_instance_carries_message_and_param() -> None:
    err = InvalidRequestError("bad n", param="n")
    assert str(err) == "bad n"
    assert err.message == "bad n"
    assert err.param == "n"
    assert err.status == 400
    assert err.wire_code == "invalid_request"
    assert err.headers() == {}
    assert InternalError("x").param is None


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [(1.2, "2"), (1.0, "1"), (0.2, "1"), (0.0, "1"), (2.5, "3"), (59.01, "60"), (30, "30")],
)
@pytest.mark.parametrize("cls", [RateLimitedError, BudgetExceededError, ProviderRateLimitedError])
def test_retry_after_header_rounds_up_to_whole_seconds(cls: type, retry_after_s: float, header: str) -> None:
    err = cls("slow down", retry_after_s=retry_after_s)
    assert err.headers() == {"Retry-After": header}
    assert err.retry_after_s == retry_after_s


@pytest.mark.parametrize("cls", [RateLimitedError, ProviderRateLimitedError])
def test_no_retry_after_header_when_unknown(cls: type) -> None:
    assert cls("slow down").headers() == {}


def test_retry_after_is_a_true_ceiling() -> None:
    assert RateLimitedError("x", retry_after_s=1.0005).headers() == {"Retry-After": "2"}


def test_headers_are_fresh_dicts() -> None:
    err = RateLimitedError("x", retry_after_s=3)
    h = err.headers()
    h["x-request-id"] = "req_1"
    assert err.headers() == {"Retry-After": "3"}


@pytest.mark.parametrize("status", [400, 404, 409, 413, 422])
def test_provider_rejected_relays_upstream_status_and_code(status: int) -> None:
    err = ProviderRejectedError("context too long", upstream_status=status, upstream_code="context_length_exceeded")
    assert err.status == status
    assert err.wire_code == "context_length_exceeded"
    assert err.upstream_status == status
    assert ProviderRejectedError("x", upstream_status=status).wire_code == "upstream_rejected"


def test_provider_unavailable_keeps_upstream_status() -> None:
    err = ProviderUnavailableError("down", upstream_status=503)
    assert err.upstream_status == 503 and err.status == 503
    assert ProviderUnavailableError("down").upstream_status is None


def test_all_candidates_failed_takes_status_of_last_error() -> None:
    errs: list[SetpointError] = [ProviderTimeoutError("t"), ProviderRejectedError("r", upstream_status=422)]
    err = AllCandidatesFailedError("all failed", errors=errs)
    assert err.status == 422
    assert err.errors is errs
    assert AllCandidatesFailedError("x", errors=[ProviderUnavailableError("u")]).status == 503
    assert AllCandidatesFailedError("none", errors=[]).status == 502


def test_config_error_problems() -> None:
    one = ConfigError("bad value", path="models.m.deployments[1].provider")
    assert one.problems == ["models.m.deployments[1].provider: bad value"]
    assert one.path == "models.m.deployments[1].provider"
    assert str(one) == "models.m.deployments[1].provider: bad value"
    many = ConfigError("invalid config", problems=["a: x", "b: y"])
    assert many.problems == ["a: x", "b: y"]
    assert str(many) == "a: x\nb: y"
    assert ConfigError("plain").problems == ["plain"]

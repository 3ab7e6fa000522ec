"""The whole setpoint error tree. Every error a client can see is one of these.

```
SetpointError
├── ConfigError                    startup only; .path = "models.gpt-4o.deployments[1].provider"
├── RequestError                   the client's fault (4xx)
│   ├── InvalidRequestError 400    ├── PayloadTooLargeError 413
│   ├── AuthenticationError 401    ├── PermissionDeniedError 403
│   ├── NotFoundError 404          │   └── ModelNotFoundError 404
│   ├── MethodNotAllowedError 405  ├── RateLimitedError 429 · BudgetExceededError 429
│   ├── HeadersTooLargeError 431   └── HttpVersionNotSupportedError 505 (HTTP/2.0 on an HTTP/1.1 server)
├── UpstreamError                  the provider's fault
│   ├── ProviderTimeoutError 504 · ProviderUnavailableError 503 · ProviderRateLimitedError 429
│   ├── ProviderResponseError 502  (garbage: non-JSON, truncated, wrong content type)
│   ├── ProviderRejectedError      (upstream 4xx relayed with its own status)
│   ├── CircuitOpenError 503 · OverloadedError 503 (shed by the gateway's overload control)
│   └── AllCandidatesFailedError (status of the last underlying error)
└── InternalError 500 · StateBackendError 503
```

Each class declares `status_code`, `code` (stable, snake_case, on the wire), `type` (OpenAI's
error type), `is_retryable` and `log_level` at class level. `wire.error_body` is the only place
that renders them; provider adapters map lower-layer exceptions into this tree in exactly one
context manager each.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

__all__ = [
    "AllCandidatesFailedError",
    "AuthenticationError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigError",
    "HeadersTooLargeError",
    "HttpVersionNotSupportedError",
    "InternalError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ProviderRateLimitedError",
    "ProviderRejectedError",
    "ProviderResponseError",
    "ProviderTimeoutError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RequestError",
    "SetpointError",
    "StateBackendError",
    "UpstreamError",
]


class SetpointError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    is_retryable: ClassVar[bool] = False
    log_level: ClassVar[int] = logging.ERROR

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def status(self) -> int:
        """Status for this instance; subclasses that relay an upstream status override it."""
        return self.status_code

    @property
    def wire_code(self) -> str:
        return self.code

    def headers(self) -> dict[str, str]:
        return {}


class _RetryAfter(SetpointError):
    """An error that tells the client when to come back (`Retry-After`, whole seconds, rounded up)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class ConfigError(SetpointError):
    """One or more problems in a config file; `problems` holds one `path: reason` line each."""

    code = "config_error"

    def __init__(self, message: str, *, path: str = "", problems: list[str] | None = None) -> None:
        line = f"{path}: {message}" if path else message
        self.problems = problems if problems is not None else [line]
        super().__init__("\n".join(self.problems))
        self.path = path


class RequestError(SetpointError):
    status_code = 400
    code = "invalid_request"
    type = "invalid_request_error"
    log_level = logging.INFO


class InvalidRequestError(RequestError):
    status_code = 400
    code = "invalid_request"


class PayloadTooLargeError(RequestError):
    status_code = 413
    code = "payload_too_large"


class HeadersTooLargeError(RequestError):
    status_code = 431
    code = "request_headers_too_large"


class HttpVersionNotSupportedError(RequestError):
    """A request line naming an HTTP version this server does not speak (it speaks 1.0 and 1.1).
    A 5xx by RFC 9110, but the client's doing: a RequestError, never retried."""

    status_code = 505
    code = "http_version_not_supported"


class AuthenticationError(RequestError):
    status_code = 401
    code = "invalid_api_key"
    type = "authentication_error"


class PermissionDeniedError(RequestError):
    status_code = 403
    code = "permission_denied"
    type = "permission_error"


class NotFoundError(RequestError):
    status_code = 404
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class MethodNotAllowedError(RequestError):
    status_code = 405
    code = "method_not_allowed"


class RateLimitedError(_RetryAfter, RequestError):
    status_code = 429
    code = "rate_limited"
    type = "rate_limit_error"



class BudgetExceededError(RateLimitedError):
    code = "budget_exceeded"
    type = "insufficient_quota"


class UpstreamError(SetpointError):
    status_code = 502
    code = "upstream_error"
    type = "upstream_error"
    log_level = logging.WARNING


class ProviderTimeoutError(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
    is_retryable = True


class ProviderUnavailableError(UpstreamError):
    status_code = 503
    code = "upstream_unavailable"
    is_retryable = True

    def __init__(self, message: str, *, upstream_status: int | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status


class ProviderRateLimitedError(_RetryAfter, UpstreamError):
    status_code = 429
    code = "upstream_rate_limited"
    type = "rate_limit_error"
    is_retryable = True



class ProviderResponseError(UpstreamError):
    status_code = 502
    code = "bad_upstream_response"


class ProviderRejectedError(UpstreamError):
    """The upstream refused the request with a 4xx; relayed with the upstream's status."""

    code = "upstream_rejected"
    type = "invalid_request_error"
    log_level = logging.INFO

    def __init__(self, message: str, *, upstream_status: int, upstream_code: str | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code

    @property
    def status(self) -> int:
        return self.upstream_status

    @property
    def wire_code(self) -> str:
        return self.upstream_code or self.code


class CircuitOpenError(_RetryAfter, UpstreamError):
    status_code = 503
    code = "circuit_open"
    is_retryable = True



class OverloadedError(_RetryAfter, UpstreamError):
    """Shed by the gateway's own overload control: do not retry elsewhere right away."""

    status_code = 503
    code = "overloaded"
    is_retryable = False



class AllCandidatesFailedError(UpstreamError):
    code = "all_candidates_failed"

    def __init__(self, message: str, *, errors: list[SetpointError]) -> None:
        super().__init__(message)
        self.errors = errors

    @property
    def status(self) -> int:
        return self.errors[-1].status if self.errors else self.status_code

    @property
    def wire_code(self) -> str:
        """The last underlying error's code: what the client would have seen without retries."""
        return self.errors[-1].wire_code if self.errors else self.code

    def headers(self) -> dict[str, str]:
        return self.errors[-1].headers() if self.errors else {}


class InternalError(SetpointError):
    status_code = 500
    code = "internal_error"


class StateBackendError(SetpointError):
    status_code = 503
    code = "state_backend_unavailable"
    is_retryable = True

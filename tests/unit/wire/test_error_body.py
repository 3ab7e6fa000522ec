"""error_body / error_event render OpenAI's error envelope for every error class."""

from __future__ import annotations

import inspect

import orjson
import pytest

import setpoint.errors as errors_mod
from setpoint.errors import (
    AllCandidatesFailedError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    ProviderRejectedError,
    ProviderTimeoutError,
    RateLimitedError,
    SetpointError,
)
from setpoint.proxy.routes import error_response
from setpoint.wire.error_body import error_body, error_event
from setpoint.wire.sse import SSEFramer, event_data


def _instance(cls: type[SetpointError]) -> SetpointError:
    """One instance of each class, built with whatever its constructor requires."""
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, object] = {}
    if "upstream_status" in params and params["upstream_status"].default is inspect.Parameter.empty:
        kwargs["upstream_status"] = 409
    if "errors" in params:
        kwargs["errors"] = [ProviderTimeoutError("t")]
    return cls(f"{cls.__name__} happened", **kwargs)  # type: ignore[arg-type]


ALL = [getattr(errors_mod, n) for n in errors_mod.__all__]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_envelope_for_every_class(cls: type[SetpointError]) -> None:
    err = _instance(cls)
    doc = orjson.loads(error_body(err))
    assert list(doc) == ["error"]
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["message"] == f"{cls.__name__} happened"
    assert doc["error"]["type"] == cls.type
    assert doc["error"]["code"] == err.wire_code
    assert doc["error"]["param"] is None


def test_param_is_rendered() -> None:
    doc = orjson.loads(error_body(ModelNotFoundError("model 'x' does not exist", param="model")))
    assert doc == {"error": {"message": "model 'x' does not exist", "type": "invalid_request_error",
                             "param": "model", "code": "model_not_found"}}


def test_rejected_uses_upstream_code() -> None:
    err = ProviderRejectedError("too long", upstream_status=400, upstream_code="context_length_exceeded")
    assert orjson.loads(error_body(err))["error"]["code"] == "context_length_exceeded"


def test_message_with_quotes_and_unicode_is_valid_json() -> None:
    msg = 'bad "value" \n in «field» 🚀'
    assert orjson.loads(error_body(InvalidRequestError(msg)))["error"]["message"] == msg


def test_error_event_is_one_sse_event_with_the_envelope() -> None:
    err = ProviderTimeoutError("upstream x timed out")
    raw = error_event(err)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    framer = SSEFramer()
    (event,) = framer.feed(raw)
    assert framer.pending == b""
    data = event_data(event)
    assert data is not None
    assert orjson.loads(data) == orjson.loads(error_body(err))


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_error_response_status_and_body(cls: type[SetpointError]) -> None:
    err = _instance(cls)
    resp = error_response(err, "req_abc")
    assert resp.status == err.status
    assert resp.content_type == "application/json"
    assert resp.headers["x-request-id"] == "req_abc"
    assert resp.body == error_body(err)


def test_rate_limited_response_has_retry_after_2() -> None:
    resp = error_response(RateLimitedError("slow down", retry_after_s=1.2))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert "x-request-id" not in resp.headers


def test_rejected_response_relays_upstream_status() -> None:
    resp = error_response(ProviderRejectedError("nope", upstream_status=422))
    assert resp.status == 422
    assert orjson.loads(resp.body)["error"]["type"] == "invalid_request_error"  # type: ignore[arg-type]


def test_all_candidates_failed_response_status() -> None:
    err = AllCandidatesFailedError("all failed", errors=[ProviderRejectedError("x", upstream_status=404)])
    assert error_response(err).status == 404


def test_config_error_renders_all_problems() -> None:
    err = ConfigError("invalid config", problems=["a: x", "b: y"])
    assert orjson.loads(error_body(err))["error"]["message"] == "a: x\nb: y"

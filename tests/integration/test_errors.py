"""Bad input gets an OpenAI-shaped 4xx (never a 500, never the presented key echoed back); a broken
upstream gets a 5xx or an explicit stream error (never a clean-looking answer)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

MESSAGES = [{"role": "user", "content": "hello there"}]
CHAT_OK = {"model": "chat-a", "messages": MESSAGES}
UPSTREAM_KEY = "upstream-provider-secret-xyz-987"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_error(
    resp: httpx.Response, status: int, code: str | None = None, param: str | None = None,
    hidden: tuple[str, ...] = (),
) -> dict[str, Any]:
    """An OpenAI error envelope with the given status; none of `hidden` appears anywhere in it."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    doc = resp.json()
    assert set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) >= {"message", "type", "code", "param"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert isinstance(err["code"], str) and err["code"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    for secret in hidden:
        assert secret not in resp.text
        assert all(secret not in v for v in resp.headers.values())
    return err


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for event in text.replace("\r\n", "\n").split("\n\n"):
        lines = [ln[5:].lstrip(" ") for ln in event.split("\n") if ln.startswith("data:")]
        if lines:
            out.append("\n".join(lines))
    return out


# -- malformed requests -------------------------------------------------------------------------

BAD_CHAT_BODIES: list[tuple[str, bytes, str | None]] = [
    ("malformed_json", b'{"model": "chat-a", "messages": [', None),
    ("non_utf8", b"\xff\xfe{\x00\x81garbage", None),
    ("non_utf8_inside_string", b'{"model": "chat-\xff", "messages": []}', None),
    ("json_array", orjson.dumps([CHAT_OK]), None),
    ("json_string", b'"hello"', None),
    ("json_null", b"null", None),
    ("empty_body", b"", None),
    ("deeply_nested", b"[" * 5000, None),
    ("huge_integer", b'{"model": "chat-a", "messages": [], "max_tokens": 99999999999999999999999999}', None),
    ("model_int", orjson.dumps({"model": 5, "messages": MESSAGES}), "model"),
    ("model_empty", orjson.dumps({"model": "", "messages": MESSAGES}), "model"),
    ("model_missing", orjson.dumps({"messages": MESSAGES}), "model"),
    ("messages_missing", orjson.dumps({"model": "chat-a"}), "messages"),
    ("messages_not_list", orjson.dumps({"model": "chat-a", "messages": "hello"}), "messages"),
    ("messages_empty", orjson.dumps({"model": "chat-a", "messages": []}), "messages"),
    ("message_not_object", orjson.dumps({"model": "chat-a", "messages": ["hi"]}), "messages[0]"),
    ("message_without_role", orjson.dumps({"model": "chat-a", "messages": [{"content": "hi"}]}), "messages[0].role"),
    ("stream_yes", orjson.dumps({**CHAT_OK, "stream": "yes"}), "stream"),
    ("stream_options_list", orjson.dumps({**CHAT_OK, "stream": True, "stream_options": []}), "stream_options"),
    ("max_tokens_string", orjson.dumps({**CHAT_OK, "max_tokens": "5"}), "max_tokens"),
    ("max_tokens_zero", orjson.dumps({**CHAT_OK, "max_tokens": 0}), "max_tokens"),
    ("max_tokens_bool", orjson.dumps({**CHAT_OK, "max_tokens": True}), "max_tokens"),
    ("n_zero", orjson.dumps({**CHAT_OK, "n": 0}), "n"),
    ("n_float", orjson.dumps({**CHAT_OK, "n": 1.5}), "n"),
    ("temperature_string", orjson.dumps({**CHAT_OK, "temperature": "hot"}), "temperature"),
    ("tools_object", orjson.dumps({**CHAT_OK, "tools": {"type": "function"}}), "tools"),
    ("response_format_string", orjson.dumps({**CHAT_OK, "response_format": "json"}), "response_format"),
    ("logprobs_string", orjson.dumps({**CHAT_OK, "logprobs": "true"}), "logprobs"),
    ("user_int", orjson.dumps({**CHAT_OK, "user": 42}), "user"),
]


@pytest.mark.parametrize(("raw", "param"), [(b, p) for _, b, p in BAD_CHAT_BODIES],
                         ids=[name for name, _, _ in BAD_CHAT_BODIES])
def test_bad_chat_body_is_400(gateway, http, keys, raw: bytes, param: str | None) -> None:
    resp = http.post(f"{gateway.base_url}/chat/completions", content=raw,
                     headers={**bearer(keys.all), "Content-Type": "application/json"})
    err = assert_error(resp, 400, code="invalid_request", param=param, hidden=(keys.all,))
    assert err["type"] == "invalid_request_error"
    assert resp.headers.get("x-request-id", "").startswith("req_")


BAD_EMBEDDING_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("input_missing", {"model": "embed"}, "input"),
    ("input_object", {"model": "embed", "input": {"text": "x"}}, "input"),
    ("input_empty_list", {"model": "embed", "input": []}, "input"),
    ("input_mixed", {"model": "embed", "input": ["a", 1]}, "input"),
    ("input_bools", {"model": "embed", "input": [True, False]}, "input"),
    ("dimensions_string", {"model": "embed", "input": "x", "dimensions": "8"}, "dimensions"),
    ("stream", {"model": "embed", "input": "x", "stream": True}, "stream"),
    ("model_missing", {"input": "x"}, "model"),
]


@pytest.mark.parametrize(("body", "param"), [(b, p) for _, b, p in BAD_EMBEDDING_BODIES],
                         ids=[name for name, _, _ in BAD_EMBEDDING_BODIES])
def test_bad_embeddings_body_is_400(gateway, http, keys, body: dict[str, Any], param: str) -> None:
    resp = http.post(f"{gateway.base_url}/embeddings", json=body, headers=bearer(keys.all))
    assert_error(resp, 400, code="invalid_request", param=param, hidden=(keys.all,))


def test_model_of_the_wrong_kind_is_400(gateway, http, keys) -> None:
    resp = http.post(f"{gateway.base_url}/chat/completions", json={"model": "embed", "messages": MESSAGES},
                     headers=bearer(keys.all))
    assert_error(resp, 400, param="model")
    resp = http.post(f"{gateway.base_url}/embeddings", json={"model": "chat-a", "input": "x"},
                     headers=bearer(keys.all))
    assert_error(resp, 400, param="model")


def test_bad_requests_are_logged_with_their_status(gateway, http, keys, gateway_rows) -> None:
    for raw in (b"{nope", orjson.dumps({"model": "chat-a"}), orjson.dumps({**CHAT_OK, "stream": "yes"})):
        assert http.post(f"{gateway.base_url}/chat/completions", content=raw, headers=bearer(keys.all)).status_code == 400
    rows = gateway_rows(gateway)
    assert [(r["status"], r["error_code"]) for r in rows] == [(400, "invalid_request")] * 3
    assert all(r["key_name"] == "all" for r in rows)


@pytest.mark.parametrize(
    "tools_body",
    [
        pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}],
                      "tool_choice": {"type": "function", "function": "f"}},
                     id="tool_choice_function_not_object"),
        pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": "string"}}}}]},
                     id="tool_parameter_schema_not_object"),
        pytest.param({"tools": [1, "x"]}, id="tools_not_objects"),
        pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, id="tool_choice_none"),
    ],
)
def test_odd_tools_never_500(gateway, http, keys, tools_body: dict[str, Any]) -> None:
    """Tools are passed through unvalidated: the upstream may accept or refuse them, but never crash."""
    resp = http.post(f"{gateway.base_url}/chat/completions", json={**CHAT_OK, **tools_body}, headers=bearer(keys.all))
    assert resp.status_code < 500, resp.text
    if resp.status_code != 200:
        assert_error(resp, resp.status_code, hidden=(keys.all,))


# -- body size ----------------------------------------------------------------------------------


@pytest.fixture
def small_body_gateway(make_gateway, default_config):
    cfg = default_config()
    cfg["server"] = {"max_body_bytes": 4096}
    return make_gateway(cfg)


def _big_chat_body() -> bytes:
    return orjson.dumps({"model": "chat-a", "messages": [{"role": "user", "content": "x" * 10_000}]})


def test_body_over_limit_is_413(small_body_gateway, http, keys) -> None:
    resp = http.post(f"{small_body_gateway.base_url}/chat/completions", content=_big_chat_body(),
                     headers=bearer(keys.all))
    assert_error(resp, 413, code="payload_too_large", hidden=(keys.all,))


def test_chunked_body_over_limit_is_413(small_body_gateway, http, keys) -> None:
    body = _big_chat_body()

    def chunks():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    resp = http.post(f"{small_body_gateway.base_url}/chat/completions", content=chunks(), headers=bearer(keys.all))
    assert_error(resp, 413, code="payload_too_large")


def test_body_under_limit_is_served(small_body_gateway, http, keys) -> None:
    resp = http.post(f"{small_body_gateway.base_url}/chat/completions", json=CHAT_OK, headers=bearer(keys.all))
    assert resp.status_code == 200, resp.text


def test_admin_body_over_limit_is_openai_shaped_413(small_body_gateway, http, keys) -> None:
    resp = http.post(f"{small_body_gateway.root_url}/admin/keys", content=b'{"name": "' + b"x" * 10_000 + b'"}',
                     headers=bearer(keys.master))
    assert_error(resp, 413, hidden=(keys.master,))


# -- models, keys, routes -----------------------------------------------------------------------


def test_unknown_model_is_404(gateway, client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_unknown_embedding_model_is_404(gateway, http, keys) -> None:
    resp = http.post(f"{gateway.base_url}/embeddings", json={"model": "nope", "input": "x"}, headers=bearer(keys.all))
    assert_error(resp, 404, code="model_not_found", param="model")


def test_model_not_allowed_for_key_is_403(gateway, http, keys, gateway_rows) -> None:
    resp = http.post(f"{gateway.base_url}/chat/completions", json={"model": "chat-b", "messages": MESSAGES},
                     headers=bearer(keys.limited))
    err = assert_error(resp, 403, code="permission_denied", param="model", hidden=(keys.limited,))
    assert err["type"] == "permission_error"
    row = gateway_rows(gateway)[0]
    assert (row["status"], row["error_code"], row["key_name"]) == (403, "permission_denied", "limited")


def test_missing_key_is_401(gateway, http) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"x-api-key": ""}):
        resp = http.post(f"{gateway.base_url}/chat/completions", json=CHAT_OK, headers=headers)
        err = assert_error(resp, 401, code="invalid_api_key")
        assert err["type"] == "authentication_error"


def test_invalid_key_is_401_and_not_echoed(gateway, http, make_client) -> None:
    wrong = "sk-this-is-not-a-valid-key-4242"
    resp = http.post(f"{gateway.base_url}/chat/completions", json=CHAT_OK, headers=bearer(wrong))
    assert_error(resp, 401, code="invalid_api_key", hidden=(wrong,))
    # The same with the SDK, and on the other endpoints.
    sdk = make_client(gateway.base_url, wrong)
    with pytest.raises(openai.AuthenticationError) as info:
        sdk.chat.completions.create(model="chat-a", messages=MESSAGES)
    assert wrong not in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    with pytest.raises(openai.AuthenticationError):
        sdk.embeddings.create(model="embed", input="x")


def test_invalid_key_checked_before_body(gateway, http) -> None:
    wrong = "sk-invalid-key-before-body-000"
    resp = http.post(f"{gateway.base_url}/chat/completions", content=b"{broken", headers=bearer(wrong))
    assert_error(resp, 401, hidden=(wrong,))


def test_non_ascii_key_is_401(gateway, http) -> None:
    resp = http.post(f"{gateway.base_url}/chat/completions", json=CHAT_OK,
                     headers={"Authorization": b"Bearer \xff\xfe\xfd-latin1-key"})
    assert_error(resp, 401, code="invalid_api_key")


def test_alternative_key_headers_work(gateway, http, keys) -> None:
    for header in ("x-api-key", "api-key"):
        resp = http.post(f"{gateway.base_url}/chat/completions", json=CHAT_OK, headers={header: keys.all})
        assert resp.status_code == 200, (header, resp.text)


def test_revoked_key_is_401(gateway, http) -> None:
    store = gateway.server.gateway.key_store
    secret, info = store.create(name="short-lived")
    assert store.revoke(info.id)
    resp = http.post(f"{gateway.base_url}/chat/completions", json=CHAT_OK, headers=bearer(secret))
    assert_error(resp, 401, code="invalid_api_key", hidden=(secret,))


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/completions"), ("GET", "/v1/assistants"), ("POST", "/v1/audio/speech"), ("GET", "/nope"),
     ("POST", "/v2/chat/completions")],
)
def test_unsupported_endpoint_is_404(gateway, http, keys, method: str, path: str) -> None:
    resp = http.request(method, gateway.root_url + path, json=CHAT_OK, headers=bearer(keys.all))
    assert_error(resp, 404, code="not_found", hidden=(keys.all,))


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"), ("DELETE", "/v1/embeddings"),
     ("POST", "/v1/models"), ("GET", "/chat/completions"), ("PATCH", "/admin/keys"), ("POST", "/health")],
)
def test_wrong_method_is_405(gateway, http, keys, method: str, path: str) -> None:
    resp = http.request(method, gateway.root_url + path, headers=bearer(keys.all))
    assert_error(resp, 405, code="method_not_allowed", hidden=(keys.all,))


def test_routes_without_v1_prefix_work(gateway, http, keys) -> None:
    assert http.post(f"{gateway.root_url}/chat/completions", json=CHAT_OK, headers=bearer(keys.all)).status_code == 200
    assert http.get(f"{gateway.root_url}/models", headers=bearer(keys.all)).json()["object"] == "list"


# -- upstream garbage (an OpenAI-compatible upstream that misbehaves) ---------------------------

_COMPLETION = {
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


def _chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    doc = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


GATE = web.AppKey("gate", threading.Event)


async def _sse(request: web.Request, *events: bytes, cut: bool = False, gated: bool = False) -> web.StreamResponse:
    """Stream `events`; with `gated`, hold everything after the first event until the test opens the
    gate (after it has received that first event), so the failure is certainly mid-stream."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i, e in enumerate(events):
        if gated and i == 1:
            assert await asyncio.to_thread(request.app[GATE].wait, 10), "the test never opened the gate"
        await resp.write(e)
    if cut:
        assert request.transport is not None
        request.transport.close()  # drop the connection mid-body
        return resp
    await resp.write_eof()
    return resp


def _err(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": "x", "param": None, "code": code}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def _garbage(request: web.Request) -> web.StreamResponse:
    mode = request.match_info["mode"]
    await request.read()
    if mode == "nonjson":
        return web.Response(body=b"<html>surprise</html>", content_type="application/json")
    if mode == "array":
        return web.Response(body=b"[1, 2, 3]", content_type="application/json")
    if mode == "html":
        return web.Response(body=orjson.dumps(_COMPLETION), content_type="text/html")
    if mode == "truncated":
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "5000"})
        await resp.prepare(request)
        await resp.write(orjson.dumps(_COMPLETION)[:40])
        assert request.transport is not None
        request.transport.close()
        return resp
    if mode == "nodone":
        return await _sse(request, _chunk("hel"), _chunk("lo"), _chunk(finish="stop"), gated=True)
    if mode == "cut":
        return await _sse(request, _chunk("hel"), _chunk("lo"), cut=True, gated=True)
    if mode == "errevent":
        return await _sse(request, _chunk("hel"), b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
                          b"data: [DONE]\n\n", gated=True)
    if mode == "notjsonevent":
        return await _sse(request, _chunk("hel"), b'data: {"usage": oops}\n\n', b"data: [DONE]\n\n", gated=True)
    if mode == "badfirst":
        return await _sse(request, b"this is not an sse line\n\n", _chunk("x"), b"data: [DONE]\n\n")
    if mode == "emptysse":
        return await _sse(request)
    if mode == "jsonforstream":
        return web.Response(body=orjson.dumps(_COMPLETION), content_type="application/json")
    if mode == "huge":  # valid JSON, over the provider's max_response_bytes (4096 here)
        return web.Response(body=orjson.dumps({**_COMPLETION, "pad": "x" * 100_000}), content_type="application/json")
    if mode == "ratelimit":
        return _err(429, "slow down", "rate_limit_exceeded", headers={"Retry-After": "7"})
    if mode == "hugeratelimit":  # an error body far over the 64 KiB read of error bodies
        return _err(429, "slow down" + " " * 2_000_000, "rate_limit_exceeded", headers={"Retry-After": "7"})
    if mode == "unavailable":
        return _err(503, "overloaded")
    if mode == "servererror":
        return _err(500, "boom")
    if mode == "badkey":
        return _err(401, f"Incorrect API key provided: {UPSTREAM_KEY}", "invalid_api_key")
    if mode == "forbidden":
        return _err(403, "no access", "forbidden")
    if mode == "rejected":
        return _err(400, "temperature is out of range", "invalid_value")
    if mode == "stall":
        await asyncio.sleep(5)
        return web.Response(body=orjson.dumps(_COMPLETION), content_type="application/json")
    raise AssertionError(f"unknown mode {mode}")


GARBAGE_MODES = ("nonjson", "array", "html", "truncated", "nodone", "cut", "errevent", "notjsonevent", "badfirst",
                 "emptysse", "jsonforstream", "huge", "ratelimit", "hugeratelimit", "unavailable", "servererror", "badkey", "forbidden",
                 "rejected", "stall")


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Opened by a test once it has seen the first streamed event (opened at teardown regardless)."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture
def garbage_gw(serve_app, make_gateway, default_config, free_port, gate):
    app = web.Application()
    app[GATE] = gate
    app.router.add_post("/{mode}/v1/chat/completions", _garbage)
    upstream = serve_app(app)
    cfg = default_config()
    for mode in GARBAGE_MODES:
        cfg["providers"][f"up-{mode}"] = {
            "type": "openai_compatible", "base_url": f"{upstream.url}/{mode}/v1", "api_key": UPSTREAM_KEY,
            "timeouts": {"connect_s": 2, "read_s": 0.3 if mode == "stall" else 5},
        }
        if mode == "huge":
            cfg["providers"][f"up-{mode}"]["max_response_bytes"] = 4096
        cfg["models"][f"m-{mode}"] = {"deployments": [{"provider": f"up-{mode}", "model": "m"}]}
    cfg["providers"]["up-down"] = {"type": "openai_compatible", "base_url": f"http://127.0.0.1:{free_port()}/v1"}
    cfg["models"]["m-down"] = {"deployments": [{"provider": "up-down", "model": "m"}]}
    return make_gateway(cfg)


@pytest.mark.parametrize(
    ("mode", "stream", "status", "code"),
    [
        ("nonjson", False, 502, "bad_upstream_response"),
        ("array", False, 502, "bad_upstream_response"),
        ("html", False, 502, "bad_upstream_response"),
        ("truncated", False, 502, "bad_upstream_response"),
        ("jsonforstream", True, 502, "bad_upstream_response"),
        ("huge", False, 502, "bad_upstream_response"),
        ("badfirst", True, 502, "bad_upstream_response"),
        ("emptysse", True, 502, "bad_upstream_response"),
        ("unavailable", False, 503, "upstream_unavailable"),
        ("unavailable", True, 503, "upstream_unavailable"),
        ("servererror", False, 503, "upstream_unavailable"),
        ("badkey", False, 502, "bad_upstream_response"),
        ("badkey", True, 502, "bad_upstream_response"),
        ("forbidden", False, 502, "bad_upstream_response"),
        ("rejected", False, 400, "invalid_value"),
        ("stall", False, 504, "upstream_timeout"),
        ("down", False, 503, "upstream_unavailable"),
    ],
)
def test_upstream_failure_is_an_error_response(garbage_gw, http, keys, gateway_rows, mode, stream, status, code) -> None:
    resp = http.post(f"{garbage_gw.base_url}/chat/completions",
                     json={"model": f"m-{mode}", "messages": MESSAGES, "stream": stream}, headers=bearer(keys.all))
    assert_error(resp, status, code=code, hidden=(keys.all, UPSTREAM_KEY))
    rows = gateway_rows(garbage_gw)
    assert [(r["status"], r["error_code"]) for r in rows] == [(status, code)]


def test_upstream_401_is_not_the_clients_401(garbage_gw, make_client, keys) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m-badkey", messages=MESSAGES)
    assert not isinstance(info.value, openai.AuthenticationError)
    assert info.value.status_code == 502
    assert UPSTREAM_KEY not in str(info.value)


def test_upstream_429_keeps_retry_after(garbage_gw, make_client, keys, gateway_rows) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="m-ratelimit", messages=MESSAGES, stream=stream)
        assert info.value.status_code == 429
        assert info.value.response.headers.get("retry-after") == "7"
        assert info.value.code == "upstream_rate_limited"
    assert [r["status"] for r in gateway_rows(garbage_gw)] == [429, 429]


def test_upstream_answer_over_max_response_bytes_is_a_502_naming_the_limit(garbage_gw, make_client, keys) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m-huge", messages=MESSAGES)
    assert info.value.status_code == 502
    assert "upstream up-huge sent a body of" in info.value.message and "(the limit is 4096)" in info.value.message


def test_upstream_error_with_a_huge_body_keeps_its_status(garbage_gw, make_client, keys, gateway_rows) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m-hugeratelimit", messages=MESSAGES)
    assert info.value.response.headers.get("retry-after") == "7"
    assert [r["status"] for r in gateway_rows(garbage_gw)] == [429]


def test_upstream_503_is_503(garbage_gw, make_client, keys) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m-unavailable", messages=MESSAGES)
    assert info.value.status_code == 503


@pytest.mark.parametrize("mode", ["nodone", "cut", "errevent", "notjsonevent"])
def test_broken_stream_ends_with_error_event_not_done(garbage_gw, http, keys, gateway_rows, gate, mode) -> None:
    with http.stream("POST", f"{garbage_gw.base_url}/chat/completions",
                     json={"model": f"m-{mode}", "messages": MESSAGES, "stream": True},
                     headers=bearer(keys.all)) as resp:
        assert resp.status_code == 200  # the first chunk was good, so the stream had started
        assert resp.headers["content-type"].startswith("text/event-stream")
        parts = resp.iter_bytes()
        text = ""
        while "\n\n" not in text:
            text += next(parts).decode()
        gate.set()
        text += b"".join(parts).decode()
    events = sse_events(text)
    assert "[DONE]" not in events
    assert len(events) >= 2
    assert json.loads(events[0])["choices"][0]["delta"]["content"] == "hel"  # relayed as it came
    last = json.loads(events[-1])
    assert set(last) == {"error"}
    assert last["error"]["code"] == "bad_upstream_response"
    assert last["error"]["message"]
    assert UPSTREAM_KEY not in text and keys.all not in text
    row = gateway_rows(garbage_gw)[0]
    assert (row["status"], row["error_code"], row["is_stream"]) == (502, "bad_upstream_response", 1)


@pytest.mark.parametrize("mode", ["nodone", "cut", "errevent"])
def test_broken_stream_raises_in_sdk(garbage_gw, make_client, keys, gate, mode) -> None:
    client = make_client(garbage_gw.base_url, keys.all)
    stream = client.chat.completions.create(model=f"m-{mode}", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
            gate.set()
    assert not isinstance(info.value, openai.APIStatusError), "the failure came mid-stream, after a 200"
    assert [c.choices[0].delta.content for c in received][:1] == ["hel"], "chunks before the failure are delivered"


# -- simulated faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["cut_stream", "malformed_sse"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_sim_stream_fault_raises_and_is_logged(gateway, client, gateway_rows, fault, include_usage) -> None:
    kwargs: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(
        model="chat-a", messages=MESSAGES, stream=True, extra_body={"sim_fault": fault, "sim_output_tokens": 8}, **kwargs
    )
    got = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            got.append(chunk)
    assert got, "chunks before the fault reach the client"
    assert all(c.usage is None for c in got)
    assert info.value.body is not None and info.value.body.get("code") == "bad_upstream_response"
    row = gateway_rows(gateway)[0]
    assert row["status"] >= 500
    assert row["error_code"] == "bad_upstream_response"
    assert row["is_stream"] == 1


@pytest.mark.parametrize(
    ("fault", "exc", "status"),
    [("rate_limit", openai.RateLimitError, 429), ("unavailable", openai.InternalServerError, 503),
     ("server_error", openai.InternalServerError, 503)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_sim_status_faults(gateway, client, gateway_rows, fault, exc, status, stream) -> None:
    with pytest.raises(exc) as info:
        client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=stream, extra_body={"sim_fault": fault})
    assert info.value.status_code == status
    if fault == "rate_limit":
        assert info.value.response.headers.get("retry-after") == "1"
    row = gateway_rows(gateway)[0]
    assert row["status"] == status and row["error_code"]


def test_sim_slow_drip_still_completes(gateway, client, gateway_rows) -> None:
    chunks = list(client.chat.completions.create(
        model="chat-a", messages=MESSAGES, stream=True, extra_body={"sim_fault": "slow_drip", "sim_output_tokens": 4}
    ))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 4
    assert gateway_rows(gateway)[0]["status"] == 200

"""OpenTelemetry traces exported over real OTLP/HTTP to a local receiver, decoded with the official
protobuf definitions: one request span, one span per upstream attempt, GenAI attributes."""

from __future__ import annotations

import sys
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.conftest import ThreadedApp

MESSAGES = [{"role": "user", "content": "What is a set point?"}]


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self.app = ThreadedApp(app).start()

    async def _traces(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        self.headers.append(dict(request.headers))
        for rs in msg.resource_spans:
            self.resources.append({a.key: _value(a.value) for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.app.stop()


def traced_config(default_config: Any, sim_provider: Any, receiver: Receiver) -> dict[str, Any]:
    cfg = default_config()
    cfg["providers"]["flaky"] = sim_provider(seed=3)
    cfg["models"]["chat-fb"] = {"deployments": [
        {"provider": "flaky", "model": "sim-flaky", "extra_body": {"sim_fault": "server_error"}},
        {"provider": "sim", "model": "sim-small"},
    ]}
    cfg["observability"] = {"tracing": {"enabled": True, "endpoint": receiver.app.url + "/v1/traces",
                                        "service_name": "setpoint-test", "headers": {"x-api-key": "k123"}}}
    return cfg


def test_request_and_attempt_spans_with_genai_attributes(make_gateway, default_config, sim_provider, receiver,
                                                         keys) -> None:
    gw = make_gateway(traced_config(default_config, sim_provider, receiver))
    client = openai.OpenAI(base_url=gw.base_url, api_key=keys.all, max_retries=0)
    resp = client.chat.completions.create(model="chat-a", messages=MESSAGES, max_tokens=50, temperature=0.5)
    list(client.chat.completions.create(model="chat-a", messages=MESSAGES, stream=True))
    fb = client.chat.completions.create(model="chat-fb", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    client.close()
    assert gw.server.gateway.tracer.provider.force_flush(10_000)  # export what the batch processor holds

    spans = receiver.spans
    servers = [s for s in spans if s.kind == s.SPAN_KIND_SERVER]
    clients = [s for s in spans if s.kind == s.SPAN_KIND_CLIENT]
    assert len(servers) == 4
    assert receiver.resources[0]["service.name"] == "setpoint-test"
    assert receiver.headers[0].get("x-api-key") == "k123"

    unary = next(s for s in servers if attrs(s).get("gen_ai.request.model") == "chat-a"
                 and "gen_ai.usage.input_tokens" in attrs(s) and s.name == "chat chat-a")
    a = attrs(unary)
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.system"] == "setpoint.simulated"
    assert a["http.response.status_code"] == 200
    assert resp.usage is not None
    assert {a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]} <= {
        resp.usage.prompt_tokens, resp.usage.completion_tokens} | {a["gen_ai.usage.input_tokens"]}
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["setpoint.cost_micros"] >= 0

    # Each request span has its attempts as children, in the same trace.
    def children(parent: Any) -> list[Any]:
        return [c for c in clients if c.parent_span_id == parent.span_id and c.trace_id == parent.trace_id]

    kids = children(unary)
    assert len(kids) == 1
    ka = attrs(kids[0])
    assert ka["gen_ai.request.model"] == "sim-small" and ka["gen_ai.response.model"] == "sim-small"
    assert ka["gen_ai.request.max_tokens"] == 50 and ka["gen_ai.request.temperature"] == 0.5
    assert ka["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens

    # The fallback request: a failed attempt (error status) and a successful one.
    fb_span = next(s for s in servers if attrs(s).get("gen_ai.request.model") == "chat-fb")
    fb_kids = sorted(children(fb_span), key=lambda s: attrs(s)["setpoint.attempt"])
    assert [attrs(k)["setpoint.deployment"] for k in fb_kids] == ["flaky/sim-flaky", "sim/sim-small"]
    assert fb_kids[0].status.code == fb_kids[0].status.STATUS_CODE_ERROR
    assert attrs(fb_kids[0])["error.type"]
    assert fb_kids[1].status.code != fb_kids[1].status.STATUS_CODE_ERROR
    assert fb.choices[0].message.content

    # The stream's attempt span ends when the stream does, with its usage.
    stream_span = next(s for s in servers if s.span_id not in (unary.span_id, fb_span.span_id)
                       and attrs(s).get("gen_ai.request.model") == "chat-a")
    assert len(children(stream_span)) == 1
    assert attrs(children(stream_span)[0])["gen_ai.usage.output_tokens"] > 0

    # An error before any upstream call: a request span with an error status and no attempts.
    err = next(s for s in servers if attrs(s).get("gen_ai.request.model") == "nope")
    assert err.status.code == err.status.STATUS_CODE_ERROR
    assert attrs(err)["error.type"] == "model_not_found"
    assert children(err) == []


def test_incoming_traceparent_is_the_parent(make_gateway, default_config, sim_provider, receiver, keys, http) -> None:
    gw = make_gateway(traced_config(default_config, sim_provider, receiver))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    r = http.post(gw.base_url + "/chat/completions", json={"model": "chat-a", "messages": MESSAGES},
                  headers={"Authorization": "Bearer " + keys.all, "traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200
    assert gw.server.gateway.tracer.provider.force_flush(10_000)
    server = next(s for s in receiver.spans if s.kind == s.SPAN_KIND_SERVER)
    assert server.trace_id.hex() == trace_id
    assert server.parent_span_id.hex() == parent


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path) -> None:
    """Off by default: a gateway that served a request has not imported the SDK."""
    import subprocess

    code = (
        "import sys, json, urllib.request\n"
        "from setpoint.config.load import parse_config\n"
        "from setpoint.config.compile import compile_config\n"
        "from setpoint.proxy.background import BackgroundGateway\n"
        f"cfg = {{'data_dir': {str(tmp_path)!r}, 'providers': {{'sim': {{'type': 'simulated'}}}},\n"
        "       'models': {'m': {'deployments': [{'provider': 'sim', 'model': 'x'}]}},\n"
        "       'keys': [{'name': 'k', 'key': 'sk-0123456789abcdef'}]}\n"
        "with BackgroundGateway(compile_config(parse_config(cfg, env={}))) as gw:\n"
        "    body = json.dumps({'model': 'm', 'messages': [{'role': 'user', 'content': 'hi'}]}).encode()\n"
        "    req = urllib.request.Request(gw.base_url + '/chat/completions', data=body, headers={\n"
        "        'Authorization': 'Bearer sk-0123456789abcdef', 'Content-Type': 'application/json'})\n"
        "    assert urllib.request.urlopen(req, timeout=30).status == 200\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=str(_root()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _root() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parents[2]

"""OpenTelemetry traces with the GenAI semantic conventions: one SERVER span per request, one CLIENT
span per upstream attempt under it (retries and fallbacks are separate attempts).

Off by default, and then free: the gateway holds no tracer, `ctx.trace` stays None, and nothing of
OpenTelemetry is imported. When on, spans go through a `BatchSpanProcessor` to an OTLP/HTTP
exporter on the SDK's own thread; a W3C `traceparent` from the client becomes the parent.
The tracer provider is this gateway's own, never the process-global one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span

    from setpoint.config.schema import TracingConfig
    from setpoint.models import Deployment
    from setpoint.proxy.context import RequestContext

__all__ = ["RequestTrace", "Tracer"]

_OPERATION = {"chat": "chat", "embeddings": "embeddings"}


class Tracer:
    def __init__(self, cfg: TracingConfig, processor: SpanProcessor | None = None) -> None:
        """`processor` replaces the OTLP exporter (tests pass an in-memory one)."""
        try:
            import opentelemetry.exporter.otlp.proto.http  # noqa: F401
            import opentelemetry.sdk  # noqa: F401
        except ImportError:
            from setpoint.errors import ConfigError

            raise ConfigError("observability.tracing.enabled needs OpenTelemetry: pip install 'setpoint[otel]'") from None
        from opentelemetry.propagators.textmap import DefaultGetter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if processor is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.endpoint, headers=dict(cfg.headers)))
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer("setpoint")
        self._propagator = TraceContextTextMapPropagator()
        self._getter = DefaultGetter()
        self._kinds = (SpanKind.SERVER, SpanKind.CLIENT)
        self._status = (Status, StatusCode)

    def start(self, ctx: RequestContext) -> RequestTrace:
        from opentelemetry.trace import set_span_in_context

        carrier = {k.lower(): v for k, v in ctx.headers.items() if k.lower() in ("traceparent", "tracestate")}
        parent = self._propagator.extract(carrier) if carrier else None
        op = _OPERATION.get(ctx.endpoint, ctx.endpoint)
        span = self._tracer.start_span(op, context=parent, kind=self._kinds[0],
                                       attributes={"gen_ai.operation.name": op, "setpoint.request_id": ctx.request_id})
        return RequestTrace(self, span, set_span_in_context(span))

    def shutdown(self) -> None:
        self.provider.shutdown()


class RequestTrace:
    """The spans of one request. Every method is cheap and never raises into the request path."""

    __slots__ = ("_context", "_tracer", "span")

    def __init__(self, tracer: Tracer, span: Span, context: Any) -> None:
        self._tracer = tracer
        self.span = span
        self._context = context

    def attempt(self, ctx: RequestContext, dep: Deployment, number: int) -> Span:
        op = _OPERATION.get(ctx.endpoint, ctx.endpoint)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.system": dep.provider.system,
            "gen_ai.provider.name": dep.provider.system,
            "gen_ai.request.model": dep.upstream_model,
            "setpoint.deployment": dep.name,
            "setpoint.attempt": number,
        }
        body = ctx.body
        for field, attr in (("max_tokens", "gen_ai.request.max_tokens"), ("temperature", "gen_ai.request.temperature"),
                            ("top_p", "gen_ai.request.top_p"), ("seed", "gen_ai.request.seed")):
            value = body.get(field)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs[attr] = value
        return self._tracer._tracer.start_span(f"{op} {dep.upstream_model}", context=self._context,
                                               kind=self._tracer._kinds[1], attributes=attrs)

    def end_attempt(self, span: Span, ctx: RequestContext, error: BaseException | None = None) -> None:
        if error is not None:
            status_cls, code = self._tracer._status
            span.set_attribute("error.type", getattr(error, "wire_code", None) or type(error).__name__)
            span.set_status(status_cls(code.ERROR, str(getattr(error, "message", error))[:200]))
        else:
            _usage_attributes(span, ctx)
        span.end()

    def finish(self, ctx: RequestContext) -> None:
        span = self.span
        op = _OPERATION.get(ctx.endpoint, ctx.endpoint)
        span.update_name(f"{op} {ctx.model}" if ctx.model else op)
        span.set_attribute("gen_ai.request.model", ctx.model or "")
        dep = ctx.deployment
        if dep is not None:
            span.set_attribute("gen_ai.system", dep.provider.system)
            span.set_attribute("gen_ai.provider.name", dep.provider.system)
            span.set_attribute("setpoint.deployment", dep.name)
        span.set_attribute("http.response.status_code", ctx.status)
        if ctx.key is not None and ctx.key.team:
            span.set_attribute("setpoint.team", ctx.key.team)
        if ctx.cost_micros is not None:
            span.set_attribute("setpoint.cost_micros", ctx.cost_micros)
        cache = ctx.annotations.get("cache")
        if cache is not None:
            span.set_attribute("setpoint.cache", cache)
        if ctx.overhead_ms is not None:
            span.set_attribute("setpoint.overhead_ms", round(ctx.overhead_ms, 3))
        _usage_attributes(span, ctx)
        if ctx.status >= 400:
            status_cls, code = self._tracer._status
            span.set_attribute("error.type", ctx.error_code or str(ctx.status))
            span.set_status(status_cls(code.ERROR, ctx.error_code or ""))
        span.end()


def _usage_attributes(span: Span, ctx: RequestContext) -> None:
    dep = ctx.deployment
    if dep is not None:
        span.set_attribute("gen_ai.response.model", dep.upstream_model)
    u = ctx.usage
    if u.is_reported or u.prompt_tokens or u.completion_tokens:
        span.set_attribute("gen_ai.usage.input_tokens", u.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", u.completion_tokens)
    if ctx.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [ctx.finish_reason])

"""The per-request context: inputs set once by the data plane, annotations added by stages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from setpoint.types import Usage

if TYPE_CHECKING:
    from setpoint.keys.model import KeyInfo
    from setpoint.models import Deployment, ModelRoute
    from setpoint.observability.tracing import RequestTrace

__all__ = ["Finalizer", "RequestContext", "StreamGuard"]


class StreamGuard(Protocol):
    """Called by the stream relay as output arrives, before it is forwarded; raising cuts the stream."""

    async def on_output(self, ctx: RequestContext, output_tokens: int) -> None: ...


Finalizer = Callable[["RequestContext"], Awaitable[None]]


@dataclass(slots=True)
class RequestContext:
    request_id: str
    endpoint: str  # "chat" | "embeddings"
    started_at: float  # epoch seconds
    started_mono: float
    headers: Mapping[str, str]
    raw: bytes
    body: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    is_stream: bool = False
    user: str | None = None
    key: KeyInfo | None = None
    route: ModelRoute | None = None
    deployment: Deployment | None = None
    usage: Usage = field(default_factory=Usage)
    status: int = 200
    error_code: str | None = None
    ttft_ms: float | None = None
    upstream_ms: float | None = None
    upstream_started: float | None = None  # monotonic seconds
    upstream_wait_s: float = 0.0  # time spent waiting on upstream calls up to the response (all attempts)
    overhead_ms: float | None = None  # gateway time before the response started, excluding upstream waits
    finish_reason: str | None = None
    output_text: list[str] | None = None  # collected only when content logging is on
    run_id: str | None = None
    prompt_tokens_counted: int | None = None  # tokenizer count of the prompt, once per request
    priority: str = "default"  # critical | default | sheddable
    deadline_at: float | None = None  # monotonic seconds; from x-setpoint-deadline-ms
    cost_micros: int | None = None  # set once usage is final
    is_recorded: bool = False
    is_cache_hit: bool = False
    stream_payloads: list[bytes] | None = None  # the upstream's stream events (for the cache)
    is_body_modified: bool = False  # a stage changed `body`: it must be re-serialised upstream
    stream_guard: StreamGuard | None = None
    finalizers: list[Finalizer] = field(default_factory=list)  # run once, when the request ends
    response_headers: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    trace: RequestTrace | None = None  # set only when tracing is on

    def deadline_s(self, clock: Any) -> float | None:
        """Seconds left before the client's deadline, or None without one."""
        return None if self.deadline_at is None else self.deadline_at - clock.monotonic()

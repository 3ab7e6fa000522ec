"""Shared value types and protocols: usage, replies, the upstream call, the provider and stage seams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from setpoint.proxy.context import RequestContext

__all__ = ["Next", "Provider", "Reply", "Stage", "UpstreamCall", "UpstreamStream", "Usage"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    is_reported: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def update_from(self, usage: Any) -> None:
        """Take an OpenAI `usage` object (ignores anything that is not one)."""
        if not isinstance(usage, dict):
            return
        self.prompt_tokens = _int(usage.get("prompt_tokens"))
        self.completion_tokens = _int(usage.get("completion_tokens"))
        pd = usage.get("prompt_tokens_details")
        self.cached_tokens = _int(pd.get("cached_tokens")) if isinstance(pd, dict) else 0
        cd = usage.get("completion_tokens_details")
        self.reasoning_tokens = _int(cd.get("reasoning_tokens")) if isinstance(cd, dict) else 0
        self.is_reported = True


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


class UpstreamStream(Protocol):
    """Raw bytes of an upstream SSE body. `aclose()` cancels the upstream request."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Reply:
    """What the pipeline returns: a whole body or a stream of raw SSE bytes."""

    status: int = 200
    body: bytes | None = None
    stream: UpstreamStream | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class UpstreamCall:
    """One attempt against one deployment."""

    path: str  # "/chat/completions" or "/embeddings"
    body: dict[str, Any]
    is_stream: bool
    request_id: str
    raw: bytes | None = None  # the exact bytes of `body` when the client's body is forwarded as is


class Provider(Protocol):
    """An upstream adapter. Raises only `setpoint.errors.UpstreamError` subclasses."""

    name: str
    system: ClassVar[str]  # the provider's family for traces: "openai", "anthropic", ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, call: UpstreamCall) -> Reply: ...


Next = Callable[["RequestContext"], Awaitable[Reply]]


class Stage(Protocol):
    name: ClassVar[str]

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply: ...

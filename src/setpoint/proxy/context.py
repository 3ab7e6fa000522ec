"""The per-request context: inputs set once by the data plane, annotations added by stages."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from setpoint.types import Usage

if TYPE_CHECKING:
    from setpoint.keys.model import KeyInfo
    from setpoint.models import Deployment, ModelRoute

__all__ = ["RequestContext"]


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
    finish_reason: str | None = None
    output_text: list[str] | None = None  # collected only when content logging is on
    annotations: dict[str, Any] = field(default_factory=dict)

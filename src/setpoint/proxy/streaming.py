"""Relay an upstream SSE stream to the client, parsing only what accounting needs.

Events pass through byte for byte. The relay reads `usage`, the finish reason and TTFT; hides the
usage chunk the gateway asked for on the client's behalf; holds back `[DONE]` so the request record
is spooled before the client sees the end; and turns a stream that ends without `[DONE]`, a
malformed event or an upstream error event into a `SetpointError` (never a clean end).
"""

from __future__ import annotations

from typing import Any

import orjson

from setpoint.accounting.tokens import count_text
from setpoint.accounting.usage_fallback import stream_delta_text
from setpoint.clock import Clock
from setpoint.errors import ProviderResponseError
from setpoint.proxy.context import RequestContext
from setpoint.wire.sse import DONE, MalformedEventError, SSEFramer, event_data

__all__ = ["StreamRelay"]

_SEP = b"\n\n"
_DONE_TAIL = b"data: [DONE]\n\n"


class StreamRelay:
    __slots__ = ("_clock", "_count", "_ctx", "_fast", "_framer", "_hide_usage", "_kept", "_provider", "is_done",
                 "output_tokens")

    def __init__(self, ctx: RequestContext, clock: Clock) -> None:
        self._ctx = ctx
        self._clock = clock
        self._framer = SSEFramer()
        self._hide_usage = bool(ctx.annotations.get("usage_injected"))
        self._provider = ctx.deployment.provider.name if ctx.deployment else "upstream"
        self._count = ctx.stream_guard is not None  # count output as it arrives (budget holds)
        # Whole chunks of plain `data: {...}` events can skip the event-by-event path when nothing
        # needs every event: no usage to hide, no tokens to count, no content to keep.
        self._fast = not self._hide_usage and not self._count and ctx.output_text is None
        self.is_done = False
        self.output_tokens = 0  # gateway-counted, only when a guard needs it
        # What was relayed, unparsed (for usage fallback and the cache): single payloads (`{...}`)
        # and, from the fast path, whole blocks of events (`data: {...}\n\n...`).
        self._kept: list[bytes] = []

    @property
    def payloads(self) -> list[bytes]:
        """The upstream's data payloads so far, in order."""
        out: list[bytes] = []
        for item in self._kept:
            if item.startswith(b"data: "):
                out.extend(event[6:] for event in item.split(_SEP) if event)
            else:
                out.append(item)
        return out

    def generated_text(self) -> list[str]:
        """What the upstream generated so far (parsed only when usage is missing)."""
        return [stream_delta_text(p) for p in self.payloads]

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send to the client for this upstream chunk (may be empty)."""
        ctx = self._ctx
        if ctx.ttft_ms is None:
            ctx.ttft_ms = (self._clock.monotonic() - ctx.started_mono) * 1000
        if self._fast and not self.is_done and not self._framer.pending:
            out = self._feed_whole(chunk)
            if out is not None:
                return out
        kept: list[bytes] = []
        for event in self._framer.feed(chunk):
            if self.is_done:
                continue  # nothing may follow [DONE]
            if event.startswith(b"data: {") and b"\n" not in event:
                # The common case: one single-line JSON payload. Parse only if accounting needs it.
                data = event[6:]
                self._kept.append(data)
                if self._count:
                    self.output_tokens += count_text(stream_delta_text(data))
                if (
                    self._ctx.output_text is None
                    and b'"usage"' not in data
                    and b'"finish_reason":"' not in data
                    and not data.startswith(b'{"error"')
                ) or self._inspect(data):
                    kept.append(event)
                continue
            try:
                data = event_data(event)
            except MalformedEventError as exc:
                raise ProviderResponseError(f"upstream {self._provider} sent a malformed stream event: {exc}") from None
            if data is None:
                kept.append(event)
                continue
            if data == DONE:
                self.is_done = True
                continue
            if not data.startswith(b"{"):
                raise ProviderResponseError(f"upstream {self._provider} sent a stream event that is not JSON")
            self._kept.append(data)
            if self._count:
                self.output_tokens += count_text(stream_delta_text(data))
            if self._inspect(data):
                kept.append(event)
        if not kept:
            return b""
        return _SEP.join(kept) + _SEP

    def _feed_whole(self, chunk: bytes) -> bytes | None:
        """The fast path: a chunk made only of whole single-line `data: {...}` events (and perhaps a
        final `data: [DONE]`) passes through as one slice; only the events that carry usage, a
        finish reason or an error are parsed. None: not such a chunk, take the event path."""
        if not chunk.endswith(_SEP) or b"\r" in chunk:
            return None
        done = chunk.endswith(_DONE_TAIL) and (len(chunk) == len(_DONE_TAIL) or chunk[-len(_DONE_TAIL) - 2:-len(_DONE_TAIL)] == _SEP)
        body = chunk[: -len(_DONE_TAIL)] if done else chunk
        n = body.count(_SEP)
        if (
            body.count(b"\n") != 2 * n
            or body.count(b"\n\ndata: {") != max(0, n - 1)
            or (n and not body.startswith(b"data: {"))
        ):
            return None  # multi-line events, comments, other fields, non-JSON payloads, or [DONE] inside
        if n:
            spans: dict[int, int] = {}  # start -> end of each event to parse, once each
            for marker in (b'"finish_reason":"', b'"usage"', b'data: {"error"'):
                pos = body.find(marker)
                while pos != -1:
                    sep = body.rfind(_SEP, 0, pos)
                    end = body.find(_SEP, pos)
                    spans[0 if sep < 0 else sep + 2] = end
                    pos = body.find(marker, end)
            for start in sorted(spans):  # in stream order, as the event path would
                try:
                    self._inspect(body[start + 6:spans[start]])  # never hides: no usage to hide on this path
                except ProviderResponseError:
                    self._kept.append(body[: spans[start] + 2])  # kept up to the failing event, as the event path
                    raise
            self._kept.append(body)
        if done:
            self.is_done = True
        return body

    def _inspect(self, data: bytes) -> bool:
        """Account for one data payload; False when the event is hidden from the client."""
        ctx = self._ctx
        wants_text = ctx.output_text is not None
        try:
            doc: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderResponseError(f"upstream {self._provider} sent a stream event that is not JSON") from None
        if not isinstance(doc, dict):
            return True
        if "error" in doc and "choices" not in doc:
            err = doc["error"]
            msg = err.get("message") if isinstance(err, dict) else err
            raise ProviderResponseError(f"upstream {self._provider} failed mid-stream: {msg}")
        choices = doc.get("choices")
        if isinstance(choices, list):
            for c in choices:
                if not isinstance(c, dict):
                    continue
                fr = c.get("finish_reason")
                if isinstance(fr, str):
                    ctx.finish_reason = fr
                if wants_text and c.get("index", 0) == 0:
                    delta = c.get("delta")
                    if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                        ctx.output_text.append(delta["content"])  # type: ignore[union-attr]
        usage = doc.get("usage")
        if isinstance(usage, dict):
            ctx.usage.update_from(usage)
            if self._hide_usage and not choices:
                return False
        return True

    def finish(self) -> None:
        """Call when the upstream body ended; raises if it ended without a proper `[DONE]`."""
        if not self.is_done:
            raise ProviderResponseError(f"upstream {self._provider} ended the stream before it was complete")

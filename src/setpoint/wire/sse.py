"""Server-sent events framing for OpenAI-style streams.

`SSEFramer` cuts a byte stream into whole events without copying more than the unfinished tail;
`event_data` pulls the `data:` payload out of one event. Only what accounting needs is parsed.
"""

from __future__ import annotations

__all__ = ["DONE", "MalformedEventError", "SSEFramer", "event_data"]

DONE = b"[DONE]"
_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")


class MalformedEventError(ValueError):
    """An event line that is not an SSE field."""


class SSEFramer:
    """Feed raw chunks, get back complete events (each without its trailing blank line)."""

    __slots__ = ("_after_cr", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._after_cr = False  # the previous chunk ended in "\r": a leading "\n" belongs to it

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        buf = self._tail + chunk if self._tail else chunk
        if buf.find(b"\r") >= 0:  # not `in`: see proxy/streaming.py
            self._after_cr = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = buf.split(b"\n\n")
        self._tail = parts.pop()
        return [event for p in parts if (event := p.strip(b"\n"))]

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not been terminated yet."""
        return self._tail


def event_data(event: bytes) -> bytes | None:
    """The joined `data:` payload of one event, or None for comment/metadata-only events.

    Raises `MalformedEventError` for a line that is not an SSE field."""
    if event.startswith(b"data: ") and event.find(b"\n") < 0:
        return event[6:]
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            v = line[5:]
            data.append(v[1:] if v.startswith(b" ") else v)
        elif line and not line.startswith(_FIELDS):
            raise MalformedEventError(line[:80].decode("utf-8", "replace"))
    return b"\n".join(data) if data else None

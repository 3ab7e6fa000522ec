"""The simulated upstream's brain: from a request body, a seed and a request number, plan an answer.

A plan is data (an error, or timed SSE events, or a JSON body), so the in-process adapter and the
HTTP server (`setpoint sim-provider`) play exactly the same plan. Deterministic: the same seed and
the same sequence of requests give the same plans. A request can force a fault or a length with
the body fields `sim_fault` and `sim_output_tokens` (passed through the gateway like any unknown
field), which tests use to script scenarios.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import orjson

from setpoint.config.schema import SimulatedProviderConfig

__all__ = ["FAULTS", "SimEvent", "SimPlan", "SimulatedEngine", "count_prompt_tokens"]

FAULTS = ("rate_limit", "server_error", "unavailable", "stall", "cut_stream", "malformed_sse", "slow_drip")

_WORDS = (
    "the quick brown fox jumps over a lazy dog while setpoint keeps every budget rate and "
    "latency at its set point so that agents run calmly under load and nothing is lost"
).split()


def count_prompt_tokens(body: dict[str, Any]) -> int:
    """A deterministic stand-in for a tokenizer: words of every message plus 4 per message."""
    total = 0
    for m in body.get("messages") or ():
        if not isinstance(m, dict):
            continue
        total += 4
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.split())
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"].split())
    return max(total, 1)


@dataclass(slots=True)
class SimEvent:
    delay_s: float
    data: bytes


@dataclass(slots=True)
class SimPlan:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the first byte (or before the error)
    body: bytes | None = None  # unary JSON or error body
    events: list[SimEvent] = field(default_factory=list)  # stream, in order; no [DONE] if cut
    is_cut: bool = False  # the connection drops after the last event


def _error_body(message: str, etype: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}})


class SimulatedEngine:
    def __init__(self, cfg: SimulatedProviderConfig, name: str = "simulated") -> None:
        self._cfg = cfg
        self._name = name
        self._counter = itertools.count()

    def _rng(self) -> random.Random:
        n = next(self._counter)
        digest = hashlib.blake2b(f"{self._cfg.seed}:{n}".encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "big"))

    def _jitter(self, rng: random.Random, ms: float) -> float:
        j = self._cfg.latency.jitter
        return max(0.0, ms * (1 + rng.uniform(-j, j)) / 1000)

    def _pick_fault(self, rng: random.Random, body: dict[str, Any]) -> str | None:
        forced = body.get("sim_fault")
        if isinstance(forced, str) and forced in FAULTS:
            return forced
        f = self._cfg.faults
        roll = rng.random()
        for name in FAULTS:
            p = float(getattr(f, name))
            if roll < p:
                return name
            roll -= p
        return None

    # -- chat -----------------------------------------------------------------------------------

    def plan_chat(self, body: dict[str, Any], is_stream: bool) -> SimPlan:
        rng = self._rng()
        fault = self._pick_fault(rng, body)
        f = self._cfg.faults
        ttft = self._jitter(rng, self._cfg.latency.ttft_ms)
        if fault == "rate_limit":
            return SimPlan(
                status=429,
                headers={"Retry-After": f"{f.retry_after_s:g}", "x-ratelimit-reset-requests": f"{f.retry_after_s:g}s"},
                delay_s=ttft / 4,
                body=_error_body("Rate limit reached (simulated)", "rate_limit_error", "rate_limit_exceeded"),
            )
        if fault in ("server_error", "unavailable"):
            status = 500 if fault == "server_error" else 503
            return SimPlan(status=status, delay_s=ttft / 2, body=_error_body(f"simulated HTTP {status}", "server_error", fault))
        if fault == "stall":
            return SimPlan(status=504, delay_s=f.stall_s, body=_error_body("simulated stall", "server_error", "timeout"))

        forced_len = body.get("sim_output_tokens")
        n_tokens = (
            forced_len
            if isinstance(forced_len, int) and forced_len > 0
            else rng.randint(self._cfg.output.min_tokens, max(self._cfg.output.min_tokens, self._cfg.output.max_tokens))
        )
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and 0 < limit < n_tokens:
            n_tokens, finish = limit, "length"
        n_choices = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        tool = self._tool_call(body)
        words = [_WORDS[rng.randrange(len(_WORDS))] for _ in range(n_tokens)]
        pieces = [(w if i == 0 else " " + w) for i, w in enumerate(words)]
        if tool is None and isinstance(body.get("response_format"), dict) and body["response_format"].get("type") in ("json_object", "json_schema"):
            pieces = ['{"answer": "', *pieces, '"}']
        prompt_tokens = count_prompt_tokens(body)
        completion_tokens = n_tokens * n_choices
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        rid = f"chatcmpl-sim{rng.getrandbits(48):012x}"
        model = str(body.get("model", "simulated"))
        want_logprobs = body.get("logprobs") is True
        if tool is not None:
            finish = "tool_calls"
        per_token = self._cfg.latency.per_token_ms * (10 if fault == "slow_drip" else 1)
        if not is_stream:
            gen_s = ttft + sum(self._jitter(rng, per_token) for _ in range(n_tokens))
            return SimPlan(
                delay_s=gen_s,
                body=self._unary_body(rid, model, pieces, tool, finish, n_choices, usage, want_logprobs),
            )
        events: list[SimEvent] = []
        base = {"id": rid, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model}

        def chunk(choices: list[Any], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        events.append(SimEvent(ttft, chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n_choices)])))
        if tool is not None:
            name, args = tool
            delta = {"tool_calls": [{"index": 0, "id": f"call_{rid[-12:]}", "type": "function", "function": {"name": name, "arguments": ""}}]}
            events.append(SimEvent(self._jitter(rng, per_token), chunk([{"index": 0, "delta": delta, "finish_reason": None}])))
            for part in (args[: len(args) // 2], args[len(args) // 2 :]):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
                events.append(SimEvent(self._jitter(rng, per_token), chunk([{"index": 0, "delta": delta, "finish_reason": None}])))
        else:
            for piece in pieces:
                choices = []
                for i in range(n_choices):
                    c: dict[str, Any] = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                    if want_logprobs:
                        c["logprobs"] = {"content": [{"token": piece, "logprob": -0.1, "bytes": list(piece.encode()), "top_logprobs": []}]}
                    choices.append(c)
                events.append(SimEvent(self._jitter(rng, per_token), chunk(choices)))
        cut = fault == "cut_stream"
        if cut:
            keep = max(2, len(events) // 2)
            del events[keep:]
            return SimPlan(events=events, is_cut=True)
        if fault == "malformed_sse":
            events.insert(max(2, len(events) // 2), SimEvent(0.0, b"this is not an sse field\n\n"))
        events.append(SimEvent(0.0, chunk([{"index": i, "delta": {}, "finish_reason": finish} for i in range(n_choices)])))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            events.append(SimEvent(0.0, chunk([], usage=usage)))
        events.append(SimEvent(0.0, b"data: [DONE]\n\n"))
        return SimPlan(events=events)

    @staticmethod
    def _tool_call(body: dict[str, Any]) -> tuple[str, str] | None:
        tools = body.get("tools")
        choice = body.get("tool_choice")
        if not isinstance(tools, list) or not tools or choice == "none":
            return None
        chosen = tools[0]
        if isinstance(choice, dict):
            fn_choice = choice.get("function")
            wanted = fn_choice.get("name") if isinstance(fn_choice, dict) else None
            chosen = next((t for t in tools if isinstance(t, dict) and (t.get("function") or {}).get("name") == wanted), chosen)
        fn = chosen.get("function") if isinstance(chosen, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return None
        params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        args = {k: (42 if isinstance(v, dict) and v.get("type") in ("number", "integer") else "42") for k, v in props.items()}
        return fn["name"], orjson.dumps(args).decode()

    @staticmethod
    def _unary_body(
        rid: str, model: str, pieces: list[str], tool: tuple[str, str] | None, finish: str,
        n_choices: int, usage: dict[str, Any], want_logprobs: bool,
    ) -> bytes:
        choices = []
        for i in range(n_choices):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            if tool is not None:
                message["content"] = None
                message["tool_calls"] = [{"id": f"call_{rid[-12:]}", "type": "function", "function": {"name": tool[0], "arguments": tool[1]}}]
            logprobs = (
                {"content": [{"token": p, "logprob": -0.1, "bytes": list(p.encode()), "top_logprobs": []} for p in pieces]}
                if want_logprobs
                else None
            )
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return orjson.dumps(
            {"id": rid, "object": "chat.completion", "created": 1_700_000_000, "model": model,
             "choices": choices, "usage": usage, "system_fingerprint": "fp_setpoint_sim"}
        )

    # -- embeddings -----------------------------------------------------------------------------

    def plan_embeddings(self, body: dict[str, Any]) -> SimPlan:
        rng = self._rng()
        fault = self._pick_fault(rng, body)
        if fault in ("rate_limit", "server_error", "unavailable"):
            status = {"rate_limit": 429, "server_error": 500, "unavailable": 503}[fault]
            return SimPlan(status=status, headers={"Retry-After": "1"} if status == 429 else {},
                           body=_error_body(f"simulated HTTP {status}", "server_error", fault))
        inp = body.get("input")
        items = [inp] if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)) else list(inp or [])
        dim = body.get("dimensions") if isinstance(body.get("dimensions"), int) else self._cfg.embedding_dim
        data, tokens = [], 0
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += max(1, len(text.split()))
            data.append({"object": "embedding", "index": i, "embedding": _vector(text, dim, self._cfg.seed)})
        return SimPlan(
            delay_s=self._jitter(rng, self._cfg.latency.ttft_ms) / 2,
            body=orjson.dumps({"object": "list", "data": data, "model": str(body.get("model", "simulated")),
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
        )


def _vector(text: str, dim: int, seed: int) -> list[float]:
    """A unit vector that depends only on the text and seed (same text, same vector)."""
    h = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    r = random.Random(int.from_bytes(h, "big"))
    v = [r.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]

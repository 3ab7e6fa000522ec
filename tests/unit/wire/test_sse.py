"""SSEFramer and event_data: framing must not depend on where the network cuts the byte stream."""

from __future__ import annotations

import random

import orjson
import pytest

from setpoint.wire.sse import DONE, MalformedEventError, SSEFramer, event_data


def _chunk(choices: list[dict], **extra: object) -> bytes:
    doc = {"id": "chatcmpl-abc123", "object": "chat.completion.chunk", "created": 1_700_000_000,
           "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_44709d6fcb", "choices": choices, **extra}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _openai_stream() -> tuple[bytes, list[bytes | None]]:
    """A realistic OpenAI chat stream (role chunk, content with multi-byte UTF-8, a keep-alive comment,
    finish chunk, usage chunk, [DONE]) and the expected `event_data` of each event in order."""
    parts: list[bytes] = []
    expected: list[bytes | None] = []

    def add(raw: bytes) -> None:
        assert raw.endswith(b"\n\n")
        parts.append(raw)
        # Computed independently of event_data: the payload after "data: ", or None for a comment.
        expected.append(raw[len(b"data: ") : -2] if raw.startswith(b"data: ") else None)

    add(_chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None, "finish_reason": None}]))
    for piece in ["Hello", " wörld", " — ", "日本語", " 🚀", "!"]:
        add(_chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]))
    add(b": keep-alive\n\n")
    add(_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    add(_chunk([], usage={"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": 0}}))
    add(b"data: [DONE]\n\n")
    return b"".join(parts), expected


def _decode_all(events: list[bytes]) -> list[bytes | None]:
    return [event_data(e) for e in events]


def _feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    framer = SSEFramer()
    events: list[bytes] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        events.extend(framer.feed(stream[prev:c]))
        prev = c
    return events, framer.pending


STREAM, EXPECTED = _openai_stream()


def test_reference_stream_is_realistic() -> None:
    # Guard the fixture itself: multi-byte text, a comment, usage and [DONE] are really in it.
    assert "日本語".encode() in STREAM and b": keep-alive" in STREAM
    assert EXPECTED[-1] == DONE
    assert EXPECTED.count(None) == 1
    docs = [orjson.loads(d) for d in EXPECTED if d not in (None, DONE)]
    assert docs[-1]["usage"]["total_tokens"] == 15
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in docs[:-1]) == "Hello wörld — 日本語 🚀!"


def test_whole_stream_in_one_chunk() -> None:
    framer = SSEFramer()
    events = framer.feed(STREAM)
    assert _decode_all(events) == EXPECTED
    assert framer.pending == b""


def test_every_single_split_point() -> None:
    for i in range(len(STREAM) + 1):
        events, pending = _feed_in_pieces(STREAM, [i])
        assert _decode_all(events) == EXPECTED, f"split at byte {i}"
        assert pending == b"", f"split at byte {i}"


def test_byte_by_byte() -> None:
    events, pending = _feed_in_pieces(STREAM, list(range(1, len(STREAM))))
    assert _decode_all(events) == EXPECTED
    assert pending == b""


def test_random_multi_splits() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(2, 40)))
        events, pending = _feed_in_pieces(STREAM, cuts)
        assert _decode_all(events) == EXPECTED, f"cuts {cuts}"
        assert pending == b""


def test_events_exclude_terminator_and_pending_holds_unfinished_tail() -> None:
    framer = SSEFramer()
    assert framer.feed(b'data: {"a":1}\n\ndata: {"b"') == [b'data: {"a":1}']
    assert framer.pending == b'data: {"b"'
    assert framer.feed(b":2}\n") == []
    assert framer.pending == b'data: {"b":2}\n'
    assert framer.feed(b"\n") == [b'data: {"b":2}']
    assert framer.pending == b""


def test_empty_chunks_are_harmless() -> None:
    framer = SSEFramer()
    assert framer.feed(b"") == []
    assert framer.feed(b"data: x") == []
    assert framer.feed(b"") == []
    assert framer.feed(b"\n\n") == [b"data: x"]


# -- CRLF / CR line endings --------------------------------------------------------------------


CRLF_STREAM = STREAM.replace(b"\n", b"\r\n")


def test_crlf_stream_whole() -> None:
    framer = SSEFramer()
    assert _decode_all(framer.feed(CRLF_STREAM)) == EXPECTED
    assert framer.pending == b""


def test_crlf_split_inside_data_line_is_fine() -> None:
    # Cuts that never separate a '\r' from its '\n' must be invisible.
    for i in range(len(CRLF_STREAM) + 1):
        if 0 < i < len(CRLF_STREAM) and CRLF_STREAM[i - 1 : i + 1] == b"\r\n":
            continue
        events, pending = _feed_in_pieces(CRLF_STREAM, [i])
        assert _decode_all(events) == EXPECTED, f"split at byte {i}"
        assert pending == b""


def test_crlf_every_split_point() -> None:
    for i in range(len(CRLF_STREAM) + 1):
        events, pending = _feed_in_pieces(CRLF_STREAM, [i])
        assert _decode_all(events) == EXPECTED, f"split at byte {i}"
        assert pending == b""


def test_extra_blank_lines_between_events_are_ignored() -> None:
    framer = SSEFramer()
    events = framer.feed(b"data: a\n\n\ndata: b\n\n")
    assert [d for d in _decode_all(events) if d is not None] == [b"a", b"b"]


def test_bare_cr_line_endings() -> None:
    framer = SSEFramer()
    events = framer.feed(b"data: a\r\rdata: b\rdata: c\r\r")
    assert _decode_all(events) == [b"a", b"b\nc"]


# -- event_data ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "data"),
    [
        (b'data: {"x":1}', b'{"x":1}'),
        (b"data:no-space", b"no-space"),
        (b"data:  two", b" two"),  # only one leading space belongs to the field syntax
        (b"data: ", b""),
        (b"data: [DONE]", DONE),
        (b"data:[DONE]", DONE),
        (b'data: {"a":\ndata: 1}', b'{"a":\n1}'),  # multi-line data is joined with \n
        (b"data: line1\ndata:\ndata: line3", b"line1\n\nline3"),
        (b"event: message\nid: 7\nretry: 100\ndata: x", b"x"),
        (b": comment\ndata: y", b"y"),
        (b"data: z\n: trailing comment", b"z"),
    ],
)
def test_event_data(event: bytes, data: bytes) -> None:
    assert event_data(event) == data


@pytest.mark.parametrize(
    "event",
    [b": keep-alive", b":", b"event: ping", b"id: 12", b"retry: 3000", b": a\n: b", b"event: x\nid: 1"],
)
def test_comment_and_metadata_only_events_have_no_data(event: bytes) -> None:
    assert event_data(event) is None


def test_multi_line_data_json_roundtrip() -> None:
    doc = {"choices": [{"delta": {"content": "multi"}}]}
    pretty = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    event = b"\n".join(b"data: " + line for line in pretty.split(b"\n"))
    framer = SSEFramer()
    (ev,) = framer.feed(event + b"\n\n")
    assert orjson.loads(event_data(ev)) == doc  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event",
    [
        b"this is not an sse field",
        b'{"choices": []}',  # NDJSON instead of SSE
        b"DATA: x",  # field names are case-sensitive
        b"data: ok\ngarbage",
        b"garbage\ndata: ok",
        b"<html><body>502 Bad Gateway</body></html>",
    ],
)
def test_malformed_lines_raise(event: bytes) -> None:
    with pytest.raises(MalformedEventError) as info:
        event_data(event)
    assert isinstance(info.value, ValueError)


def test_malformed_error_message_is_bounded_and_decoded() -> None:
    line = b"\xff" + b"x" * 500
    with pytest.raises(MalformedEventError) as info:
        event_data(line)
    msg = str(info.value)
    assert len(msg) <= 80 and "\ufffd" in msg


def test_malformed_event_from_framed_stream() -> None:
    framer = SSEFramer()
    events = framer.feed(b"data: ok\n\nthis is not an sse field\n\ndata: [DONE]\n\n")
    assert len(events) == 3
    assert event_data(events[0]) == b"ok"
    with pytest.raises(MalformedEventError):
        event_data(events[1])
    assert event_data(events[2]) == DONE

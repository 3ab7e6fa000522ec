"""Request body checks: every refusal is an InvalidRequestError naming the offending parameter."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from setpoint.errors import InvalidRequestError
from setpoint.wire.request import parse_chat, parse_embeddings, parse_json_object

MSGS = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": copy.deepcopy(MSGS)}
    body.update(fields)
    return body


def emb(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "text-embedding-3-small", "input": "hello"}
    body.update(fields)
    return body


# -- parse_json_object --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"{", "not valid JSON"),
        (b'{"model": "x",}', "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"a": "\xff"}', "UTF-8"),
        (b"[]", "must be a JSON object, got list"),
        (b'"text"', "got str"),
        (b"42", "got int"),
        (b"null", "must be a JSON object"),
        (b"true", "got bool"),
    ],
)
def test_parse_json_object_rejects(raw: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_json_object(raw)
    err = info.value
    assert fragment in err.message
    assert err.param is None
    assert err.status_code == 400


def test_parse_json_object_reports_position() -> None:
    with pytest.raises(InvalidRequestError, match=r"position \d+"):
        parse_json_object(b'{"model": }')


def test_parse_json_object_returns_dict() -> None:
    assert parse_json_object(b'{"model": "m", "n": 1, "x": {"y": [1, 2]}}') == {"model": "m", "n": 1, "x": {"y": [1, 2]}}
    assert parse_json_object('{"text": "日本語"}'.encode()) == {"text": "日本語"}


# -- parse_chat ---------------------------------------------------------------------------------


CHAT_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"messages": MSGS}, "model"),
    ("model null", {"model": None, "messages": MSGS}, "model"),
    ("empty model", chat(model=""), "model"),
    ("model int", chat(model=4), "model"),
    ("model list", chat(model=["a"]), "model"),
    ("no messages", {"model": "m"}, "messages"),
    ("messages null", chat(messages=None), "messages"),
    ("empty messages", chat(messages=[]), "messages"),
    ("messages string", chat(messages="hi"), "messages"),
    ("messages object", chat(messages={"role": "user"}), "messages"),
    ("message not object", chat(messages=["hi"]), "messages[0]"),
    ("second message not object", chat(messages=[MSGS[0], 3]), "messages[1]"),
    ("missing role", chat(messages=[MSGS[0], {"content": "x"}]), "messages[1].role"),
    ("role int", chat(messages=[{"role": 1, "content": "x"}]), "messages[0].role"),
    ("stream string", chat(stream="true"), "stream"),
    ("stream int", chat(stream=1), "stream"),
    ("stream_options list", chat(stream_options=[]), "stream_options"),
    ("n bool", chat(n=True), "n"),
    ("n float", chat(n=1.5), "n"),
    ("n zero", chat(n=0), "n"),
    ("n negative", chat(n=-2), "n"),
    ("max_tokens bool", chat(max_tokens=True), "max_tokens"),
    ("max_tokens false", chat(max_tokens=False), "max_tokens"),
    ("max_tokens string", chat(max_tokens="10"), "max_tokens"),
    ("max_tokens float", chat(max_tokens=10.0), "max_tokens"),
    ("max_tokens zero", chat(max_tokens=0), "max_tokens"),
    ("max_completion_tokens bool", chat(max_completion_tokens=True), "max_completion_tokens"),
    ("max_completion_tokens zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("temperature string", chat(temperature="0.5"), "temperature"),
    ("temperature bool", chat(temperature=True), "temperature"),
    ("top_p bool", chat(top_p=False), "top_p"),
    ("top_p list", chat(top_p=[1]), "top_p"),
    ("tools object", chat(tools={"type": "function"}), "tools"),
    ("response_format string", chat(response_format="json"), "response_format"),
    ("logprobs int", chat(logprobs=1), "logprobs"),
    ("user int", chat(user=5), "user"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in CHAT_INVALID], ids=[c[0] for c in CHAT_INVALID])
def test_parse_chat_rejects_with_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat(body)
    assert info.value.param == param
    assert info.value.status_code == 400
    assert info.value.message  # a human-readable reason


def test_bool_type_name_in_message() -> None:
    with pytest.raises(InvalidRequestError, match="'n' must be an integer, got bool"):
        parse_chat(chat(n=True))
    with pytest.raises(InvalidRequestError, match="'messages\\[0\\]' must be an object, got null"):
        parse_chat(chat(messages=[None]))


def test_parse_chat_valid_with_unknown_fields() -> None:
    body = chat(
        stream=True, stream_options={"include_usage": True}, n=2, max_tokens=10, max_completion_tokens=20,
        temperature=0, top_p=1, tools=[], response_format={"type": "json_object"}, logprobs=True, user="u-1",
        sim_fault="cut_stream", vendor_extension={"nested": [1, 2, {"x": None}]}, seed=7, frequency_penalty=0.5,
    )
    before = copy.deepcopy(body)
    assert parse_chat(body) == "gpt-4o"
    assert body == before  # unknown fields are kept untouched for pass-through


def test_parse_chat_accepts_null_optionals_and_int_numbers() -> None:
    body = chat(stream=None, n=None, max_tokens=None, temperature=None, top_p=None, user=None, tools=None)
    assert parse_chat(body) == "gpt-4o"
    assert parse_chat(chat(temperature=1, top_p=0.5)) == "gpt-4o"
    assert parse_chat(chat(max_tokens=1, n=1)) == "gpt-4o"


def test_parse_chat_messages_with_content_parts() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what is this"},
                                         {"type": "image_url", "image_url": {"url": "data:..."}}]}]
    assert parse_chat(chat(messages=msgs)) == "gpt-4o"


# -- parse_embeddings ---------------------------------------------------------------------------


EMB_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("no model", {"input": "x"}, "model"),
    ("empty model", emb(model=""), "model"),
    ("no input", {"model": "m"}, "input"),
    ("input null", emb(input=None), "input"),
    ("input int", emb(input=5), "input"),
    ("input empty list", emb(input=[]), "input"),
    ("input mixed", emb(input=["a", 1]), "input"),
    ("input bools", emb(input=[True, False]), "input"),
    ("input floats", emb(input=[1.0, 2.0]), "input"),
    ("input object", emb(input={"text": "x"}), "input"),
    ("input list of objects", emb(input=[{"text": "x"}]), "input"),
    ("token arrays with strings", emb(input=[[1, 2], ["a"]]), "input"),
    ("dimensions bool", emb(dimensions=True), "dimensions"),
    ("dimensions string", emb(dimensions="256"), "dimensions"),
    ("dimensions float", emb(dimensions=256.0), "dimensions"),
    ("user int", emb(user=1), "user"),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in EMB_INVALID], ids=[c[0] for c in EMB_INVALID])
def test_parse_embeddings_rejects_with_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_embeddings(body)
    assert info.value.param == param


@pytest.mark.parametrize(
    "inp", ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [""]], ids=["str", "strs", "tokens", "token-arrays", "empty-str"]
)
def test_parse_embeddings_valid_inputs(inp: Any) -> None:
    body = emb(input=inp, dimensions=256, encoding_format="float", user="u", unknown_vendor_field=True)
    before = copy.deepcopy(body)
    assert parse_embeddings(body) == "text-embedding-3-small"
    assert body == before


def test_parse_embeddings_rejects_bool_in_token_arrays() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_embeddings(emb(input=[[1, True]]))
    assert info.value.param == "input"

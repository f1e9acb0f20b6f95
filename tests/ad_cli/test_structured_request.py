"""Parsing the structured-output fields of a request body into StructuredOutputParams, without a server."""

import json

import pytest

pytest.importorskip("xgrammar")
from ad_cli.openai_protocol import BadRequest, ChatRequest, CompletionRequest, parse_request  # noqa: E402

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _parse(model=CompletionRequest, **fields):
    base = {"prompt": "hi"} if model is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    return parse_request(json.dumps({**base, **fields}).encode(), model)


def test_each_field_gives_its_constraint():
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    so = _parse(ChatRequest, response_format=fmt).params(16).structured_output
    assert (so.kind, json.loads(so.json_schema), so.strict) == ("json_schema", SCHEMA, True)
    so = _parse(response_format={**fmt, "json_schema": {**fmt["json_schema"], "strict": False}}).structured_output
    assert so.strict is False, "strict false: properties the schema does not name are allowed"
    assert _parse(response_format={"type": "json_object"}).structured_output.json_object
    assert _parse(response_format={"type": "text"}).structured_output is None
    assert _parse().structured_output is None
    assert _parse(guided_json=json.dumps(SCHEMA)).structured_output.kind == "json_schema"
    assert _parse(guided_regex="[0-9]+").structured_output.regex == "[0-9]+"
    assert _parse(guided_choice=["x", "y"]).structured_output.choice == ("x", "y")


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "text", "json_schema": {"name": "a", "schema": {}}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"guided_json": "{"}, "guided_json"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_fields_are_400_naming_them(fields, param):
    with pytest.raises(BadRequest) as e:
        _parse(**fields)
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(param), e.value.message

"""Structured output through the official `openai` client: response_format (json_schema, json_object) and vLLM's
guided_regex / guided_choice / guided_json, on completions and chat, streamed and not, against a real server.

The 2-layer model's answers are gibberish, so only the grammar makes them valid, and the schemas are bounded
(enums, ranged integers, short strings, short arrays) so that every answer ends within max_tokens.
"""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Describe Paris in JSON."}]


def _obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props)}


INT9 = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = [
    _obj(flag={"type": "boolean"}),
    _obj(n=INT9),
    _obj(name={"type": "string", "maxLength": 6}),
    _obj(color={"enum": ["red", "green", "blue"]}),
    _obj(tags={"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}),
    _obj(point=_obj(x={"type": "integer", "minimum": -5, "maximum": 5}, y={"type": "integer", "minimum": -5,
                                                                           "maximum": 5})),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
    {"enum": ["yes", "no", None]},
    _obj(code={"type": "string", "pattern": "^[A-Z]{3}$"}),
    _obj(ok={"const": True}),
    _obj(v={"anyOf": [INT9, {"type": "boolean"}]}),
    _obj(a={"type": "null"}, b={"type": "boolean"}),
    {"type": "object", "properties": {"x": {"type": "boolean"}, "y": {"type": "integer", "minimum": 0, "maximum": 3}},
     "required": ["x"]},
    {"$defs": {"small": {"type": "integer", "minimum": 1, "maximum": 3}}, **_obj(s={"$ref": "#/$defs/small"})},
    _obj(items={"type": "array", "items": _obj(id=INT9), "maxItems": 2}),
    _obj(word={"type": "string", "minLength": 2, "maxLength": 4}),
    {"type": "integer", "minimum": 100, "maximum": 200},
    _obj(level={"enum": [1, 2, 3]}, active={"type": "boolean"}),
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["x", "y"]}], "items": False, "minItems": 2},
    _obj(when={"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"}, ok={"type": "boolean"}),
]


@pytest.fixture(scope="module")
def client(shared_server: Any) -> Any:
    with openai.OpenAI(api_key=shared_server.key, base_url=f"{shared_server.url}/v1", max_retries=0,
                       timeout=300) as c:
        yield c


def _answer(client: Any, chat: bool, stream: bool, max_tokens: int = 48, **kw: Any) -> tuple[str, str]:
    """(text, finish_reason); `kw` goes into the body (extra_body: the client does not know vLLM's fields)."""
    common = {"model": "m", "max_tokens": max_tokens, "temperature": kw.pop("temperature", 0), "extra_body": kw}
    if chat:
        if not stream:
            choice = client.chat.completions.create(messages=CHAT, **common).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = [c for c in client.chat.completions.create(messages=CHAT, stream=True, **common) if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
    if not stream:
        choice = client.completions.create(prompt=PROMPT, **common).choices[0]
        return choice.text, choice.finish_reason
    chunks = [c for c in client.completions.create(prompt=PROMPT, stream=True, **common) if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def _all(client: Any, jobs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Send every job at once (they share the engine's batches); answers in job order."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: _answer(client, **job), jobs))


MODES = [(chat, stream) for stream in (False, True) for chat in (False, True)]


def test_json_schema_answers_validate_against_20_schemas(client: Any) -> None:
    """Each schema once, the four (endpoint, stream) modes taken in turn, all in one batch."""
    jobs = []
    for i, schema in enumerate(SCHEMAS):
        chat, stream = MODES[i % 4]
        fmt = {"type": "json_schema", "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True}}
        jobs.append({"chat": chat, "stream": stream, "response_format": fmt})
    for i, (text, reason) in enumerate(_all(client, jobs)):
        assert reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_guided_choice_regex_and_json(client: Any) -> None:
    choices = ["Paris", "London", "Berlin"]
    regex = r"[A-Z][a-z]{2,6} [0-9]{1,2}"
    jobs = [{"chat": c, "stream": s, "guided_choice": choices} for c, s in MODES]
    jobs += [{"chat": c, "stream": s, "guided_regex": regex} for c, s in MODES]
    jobs += [{"chat": c, "stream": s, "guided_json": SCHEMAS[3]} for c, s in MODES]
    answers = _all(client, jobs)
    for text, reason in answers[:4]:
        assert reason == "stop" and text in choices, text
    for text, reason in answers[4:8]:
        assert reason == "stop" and re.fullmatch(regex, text), text
    for text, reason in answers[8:]:
        assert reason == "stop" and json.loads(text)["color"] in ("red", "green", "blue"), text
    assert len({t for t, _ in answers[:4]}) == 1, "greedy: every mode gives the same choice for its prompt kind"


def test_json_object_answers_are_json_objects(client: Any) -> None:
    """The 2-layer model rarely closes a JSON string, so answers are sampled (seeded): every one that ends parses."""
    jobs = [{"chat": c, "stream": s, "response_format": {"type": "json_object"}, "temperature": 1.0, "seed": seed,
             "max_tokens": 24} for c, s in MODES for seed in range(3)]
    answers = _all(client, jobs)
    ended = [text for text, reason in answers if reason == "stop"]
    assert ended, answers
    for text in ended:
        assert isinstance(json.loads(text), dict), text
    for text, reason in answers:
        assert text.startswith("{") and reason in ("stop", "length"), text


def test_text_response_format_changes_nothing(client: Any) -> None:
    plain = _answer(client, chat=True, stream=False, max_tokens=6)
    assert _answer(client, chat=True, stream=False, max_tokens=6, response_format={"type": "text"}) == plain


def _refused(client: Any, param: str, needle: str, **kw: Any) -> None:
    for chat, stream in MODES:
        with pytest.raises(openai.BadRequestError) as info:
            _answer(client, chat, stream, **kw)
        err = info.value.body
        assert info.value.status_code == 400 and err["param"] == param and needle in err["message"], err
        assert err["message"].startswith(param), err


def test_bad_constraints_are_400_naming_the_field(client: Any) -> None:
    def fmt(schema: Any) -> dict[str, Any]:
        return {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}

    _refused(client, "response_format.json_schema.schema", "Unsupported type", response_format=fmt({"type": "nope"}))
    _refused(client, "response_format.json_schema.schema", "Cannot find", response_format=fmt({"$ref": "#/nowhere"}))
    _refused(client, "response_format.json_schema.schema", "required",
             response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    _refused(client, "response_format.type", "json_schema", response_format={"type": "grammar"})
    _refused(client, "guided_regex", "parenthesis", guided_regex="(ab")
    _refused(client, "guided_choice", "non-empty", guided_choice=[])
    _refused(client, "guided_regex", "one constraint", response_format={"type": "json_object"}, guided_regex="a")

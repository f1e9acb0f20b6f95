"""A constraint on the form of a request's output (JSON schema, any JSON object, regex, choice), checked when made.

The constraint is turned into a grammar by xgrammar, imported only when a request carries one. It is checked
in full here (the grammar is built once and dropped), so a bad schema or regex fails in its caller's hands with
a ValueError naming the field, never inside a batch; the engine compiles it again against the tokenizer.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

# `json_object`: any JSON object. xgrammar's strict mode would forbid properties the schema does not name, which
# for this schema means every property.
JSON_OBJECT_SCHEMA = '{"type": "object"}'
_KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class StructuredOutputParams:
    """Exactly one of: `json_schema` (a JSON schema, as a dict or its JSON text), `json_object=True` (any JSON
    object), `regex` (the whole output matches it), `choice` (the output is one of these strings).

    `strict` (JSON schema only): True (the default) allows no property or item the schema does not name, as
    OpenAI's strict mode; False follows JSON Schema, where unnamed properties are allowed unless forbidden.
    JSON is generated without free whitespace (", " and ": " between items): a small model left free to add
    whitespace can add it forever.
    """

    json_schema: str | dict | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be true or false, got {self.json_object!r}")
        if not isinstance(self.strict, bool):
            raise ValueError(f"strict must be true or false, got {self.strict!r}")
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(_KINDS)}; got {', '.join(given) or 'none'}")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema))
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError(f"regex must be a string, got {type(self.regex).__name__}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        try:
            self.grammar()
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with its C++ message
            raise ValueError(f"{self.kind}: {grammar_error(e)}") from None

    @classmethod
    def coerce(cls, value: Any) -> "StructuredOutputParams":
        """`value` itself, or one made from a dict of its fields (YAML, keyword arguments)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise ValueError(f"must be StructuredOutputParams or a dict of its fields, got {type(value).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """Equal for constraints that compile to the same grammar (the engine caches compiled grammars by it)."""
        return (self.kind, self.json_schema, self.regex, self.choice, self.strict if self.json_schema else None)

    def grammar(self) -> Any:
        """The constraint as an xgrammar Grammar (not yet compiled against a tokenizer)."""
        import xgrammar as xgr

        if self.json_schema is not None:
            return xgr.Grammar.from_json_schema(self.json_schema, any_whitespace=False, strict_mode=self.strict)
        if self.json_object:
            return xgr.Grammar.from_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=False, strict_mode=False)
        if self.regex is not None:
            return xgr.Grammar.from_regex(self.regex)
        # json.dumps writes each choice as a string literal with the escapes xgrammar's EBNF reads.
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in self.choice or ()))


def _schema_text(schema: Any) -> str:
    """The schema as compact JSON text; it must be a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"json_schema: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema: must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(schema, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"json_schema: not JSON-serialisable ({e})") from None


# xgrammar's messages start with "[12:00:00] /project/cpp/file.cc:123: " and may hold "Check failed: (...) is
# false: "; a client needs neither.
_SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: .*? is false:\s*")


def grammar_error(error: BaseException) -> str:
    """xgrammar's error as one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = _CHECK_FAILED.sub("", _SOURCE_PREFIX.sub("", text))
    return text[:300]

"""The request fields that constrain an answer's form: OpenAI's `response_format` and vLLM's `guided_*` extensions.

They become one StructuredOutputParams (checked in full, schema and regex compiled) while the body is parsed,
so a bad schema is a 400 naming its field before the request reaches the engine.
"""

from typing import Any, Literal

from ad_runtime import StructuredOutputParams
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class FieldError(ValueError):
    """A value the server cannot use, with the request field to blame."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None  # for the model's benefit in OpenAI's API; the grammar does not need it
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputFields(BaseModel):
    """The fields, and the one constraint they make (`structured_output`, set by `check_structured_output`)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    _structured: StructuredOutputParams | None = PrivateAttr(None)

    @property
    def structured_output(self) -> StructuredOutputParams | None:
        return self._structured

    def check_structured_output(self) -> None:
        """Build the constraint; FieldError naming the field when it is wrong or when two fields give one."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None:
            if fmt.type != "json_schema" and fmt.json_schema is not None:
                raise FieldError("response_format.json_schema", f"only allowed with type json_schema, not {fmt.type}")
            if fmt.type == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif fmt.type == "json_schema":
                if fmt.json_schema is None:
                    raise FieldError("response_format.json_schema", "required with type json_schema")
                if fmt.json_schema.schema_ is None:
                    raise FieldError("response_format.json_schema.schema", "required: the JSON schema to follow")
                # The answer follows the schema either way; strict (unless false, as vLLM) also forbids properties
                # and items the schema does not name.
                given.append(("response_format.json_schema.schema",
                              {"json_schema": fmt.json_schema.schema_, "strict": fmt.json_schema.strict is not False}))
        if self.guided_json is not None:
            given.append(("guided_json", {"json_schema": self.guided_json}))
        if self.guided_regex is not None:
            given.append(("guided_regex", {"regex": self.guided_regex}))
        if self.guided_choice is not None:
            given.append(("guided_choice", {"choice": self.guided_choice}))
        if len(given) > 1:
            raise FieldError(given[1][0], f"give one constraint on the answer's form; {given[0][0]} gives one already")
        if not given:
            return
        param, spec = given[0]
        try:
            self._structured = StructuredOutputParams(**spec)
        except ValueError as e:
            raise FieldError(param, str(e)) from None

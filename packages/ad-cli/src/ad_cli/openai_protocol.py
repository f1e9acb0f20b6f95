"""The request bodies the server takes: the OpenAI fields it honours, those it refuses by name, and their parsing.

The rule: no field is ignored silently. A field the server honours is validated and used; a known OpenAI (or
vLLM) field it does not implement is accepted only at the value that means "off" (clients send their
defaults: `best_of: 1`, `prompt_logprobs: null`), anything else there is a 400 naming it; an unknown field
is a 400 naming it. The known fields and their "off" values are listed in unsupported_fields.py.
"""

import json
from typing import Annotated, Any, ClassVar

from ad_runtime import SamplingParams
from ad_runtime.sampling_params import MAX_BIAS, MAX_LOGPROBS, MAX_N, MAX_PENALTY
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from .http_limits import one_line
from .structured_request import FieldError, StructuredOutputFields
from .unsupported_fields import CHAT_NOT_YET, COMPLETION_NOT_YET, MESSAGE_NOT_YET

# Mirrors ad_runtime.sampling_params (checked here too, so the error names the request's field).
MAX_SEED = 2**64 - 1
MAX_COUNT = 2**31 - 1
# A field name echoed in an error is cut to this length (a body may hold a key of megabytes).
_MAX_NAME = 64


class BadRequest(Exception):
    """A request the server refuses before it reaches the engine: status, message and the field to blame."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def bad_field(param: str, message: str) -> BadRequest:
    """A 400 blaming `param`, its message `param: message`."""
    return BadRequest(400, f"{param}: {message}", param)


def _valid_text(text: str) -> str:
    """Text must encode as UTF-8: a lone surrogate ("\\ud800", legal in JSON) breaks the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text ({e.reason} at position {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_text)]
TokenId = Annotated[int, Field(ge=0, le=MAX_COUNT)]


def _listed(v: Any) -> Any:
    return [v] if isinstance(v, str) else v  # `stop: "x"` is `stop: ["x"]`


def _token_id_keys(v: dict[str, float] | None) -> dict[str, float] | None:
    for key in v or ():
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_COUNT:
            raise ValueError(f"keys must be token ids (decimal strings of ints >= 0), got {json.dumps(key)[:40]}")
    return v


def _name(key: str) -> str:
    return key if len(key) <= _MAX_NAME else key[: _MAX_NAME - 3] + "..."


def _is_off(value: Any, off: Any) -> bool:
    """`value` is the "off" value `off`, type included (logprobs 0 is not logprobs false)."""
    if off is None or isinstance(off, bool):
        return value is off
    if isinstance(off, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == off
    return type(value) is type(off) and value == off


def _without_off_fields(data: dict[str, Any], known: Any, not_yet: dict[str, tuple], where: str = "") -> dict:
    """`data` less its known-but-"off" fields; BadRequest naming the first field that is unknown or not off."""
    out = {}
    for key, value in data.items():
        if key in known:
            out[key] = value
        elif key not in not_yet:
            raise bad_field(where + _name(key), "unknown field")
        elif not any(_is_off(value, off) for off in not_yet[key]):
            shown = " or ".join(json.dumps(o) for o in not_yet[key])
            raise bad_field(where + _name(key), f"not supported yet (only {shown} is accepted)")
    return out


class RequestBody(BaseModel):
    """A request body: its own fields, plus fields it knows but refuses unless they are off (`_not_yet`)."""

    model_config = ConfigDict(extra="forbid")
    _not_yet: ClassVar[dict[str, tuple]] = {}

    @classmethod
    def precheck(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The body without its "off" fields (nor its chat messages'); BadRequest naming the first it cannot honour."""
        out = _without_off_fields(data, cls.model_fields, cls._not_yet)
        if "messages" in out:  # a field of this body (else refused above): its messages' keys are checked too
            out["messages"] = _check_messages(out["messages"])
        return out

    def check(self) -> None:
        """Checks across fields, after validation."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


class SamplingRequest(StructuredOutputFields, RequestBody):
    model: str | None = None  # any name: the server answers with its own
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    # The newer name of max_tokens (chat); both given, they must agree.
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, le=MAX_COUNT)  # 0: off
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Annotated[list[Annotated[Text, Field(min_length=1)]] | None, BeforeValidator(_listed)] = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    # JSON object keys are strings: token ids as decimal strings; checked against the vocabulary when tokenising.
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]] | None,
                          AfterValidator(_token_id_keys)] = None
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    # Accepted and unused: OpenAI's end-user id for abuse monitoring (and its newer name).
    user: str | None = None
    safety_identifier: str | None = None

    @property
    def bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @property
    def num_logprobs(self) -> int | None:
        """Top logprobs per token the request asks for (0: the sampled token's only); None: no logprobs."""
        return None

    def check(self) -> None:
        try:
            self.check_structured_output()
        except FieldError as e:
            raise BadRequest(400, str(e), e.param) from None
        if self.max_completion_tokens is not None and self.max_tokens not in (None, self.max_completion_tokens):
            raise bad_field("max_completion_tokens", f"{self.max_completion_tokens} differs from max_tokens "
                                                     f"({self.max_tokens}); give one of them")
        if self.stream_options is not None and not self.stream:
            raise bad_field("stream_options", "only allowed with stream: true")
        if self.min_tokens and self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise bad_field("min_tokens",
                            f"{self.min_tokens} is more than {self.max_tokens_param} ({self.max_new_tokens})")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field that set the limit, for errors."""
        return "max_tokens" if self.max_tokens is not None else "max_completion_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def params(self, default_max: int) -> SamplingParams:
        max_tokens = self.max_new_tokens or default_max
        if (self.min_tokens or 0) > max_tokens:
            raise bad_field("min_tokens", f"{self.min_tokens} is more than the server's default max_tokens "
                                          f"({max_tokens}); give max_tokens")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k, seed=self.seed, stop=self.stop,
            structured_output=self.structured_output,
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            n=self.n or 1, logprobs=self.num_logprobs,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.bias or None, min_tokens=self.min_tokens or 0,
        )


def _prompt(v: Any) -> str | list[int]:
    # Checked by hand, not as a union: pydantic would name both union members in its error.
    if isinstance(v, str):
        return _valid_text(v)
    if isinstance(v, list) and v and all(type(t) is int and 0 <= t <= MAX_COUNT for t in v):
        return v
    raise ValueError("must be a string or a non-empty list of token ids (ints >= 0)")


class CompletionRequest(SamplingRequest):
    _not_yet: ClassVar[dict[str, tuple]] = COMPLETION_NOT_YET
    prompt: Annotated[Any, AfterValidator(_prompt)]
    echo: bool = False  # the prompt's text comes first in the answer (the first chunk of a stream)
    _echo_text: str = PrivateAttr("")  # filled when the prompt is tokenised
    # The legacy form: top logprobs per token (0: the sampled token's only). Strict: `true` is not a count.
    logprobs: Annotated[Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None,
                        BeforeValidator(lambda v: None if v is False else v)] = None

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            # OpenAI's answer would then hold the echoed prompt's logprobs too: the model runner computes the
            # logits of the last prompt position only, so prompt logprobs are not available.
            raise bad_field("logprobs", "not supported together with echo (it needs the prompt's logprobs)")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Text
    content: Text


def _check_messages(messages: Any) -> Any:
    """Chat messages with content given as text parts joined into one string (with "\\n", as vLLM does), and
    their "off" keys dropped; BadRequest naming a part that is not text or a key that is not supported."""
    if not isinstance(messages, list):
        return messages  # the model's validation says what is wrong
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = _without_off_fields(m, ("role", "content"), MESSAGE_NOT_YET, f"messages.{i}.")
            if isinstance(m.get("content"), list):
                m["content"] = _join_parts(m["content"], f"messages.{i}.content")
        out.append(m)
    return out


def _join_parts(parts: list, where: str) -> str:
    if not parts:
        raise bad_field(where, "must be a string or a non-empty list of text parts")
    texts = []
    for j, part in enumerate(parts):
        at = f"{where}.{j}"
        if not isinstance(part, dict):
            raise bad_field(at, 'must be an object like {"type": "text", "text": ...}')
        kind = part.get("type")
        if kind != "text":
            raise bad_field(f"{at}.type", f"only text parts are supported, got {json.dumps(kind)[:40]}")
        _without_off_fields(part, ("type", "text"), {}, f"{at}.")
        if not isinstance(part.get("text"), str):
            raise bad_field(f"{at}.text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatRequest(SamplingRequest):
    _not_yet: ClassVar[dict[str, tuple]] = CHAT_NOT_YET
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise bad_field("top_logprobs", "needs logprobs: true")

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(RequestBody):
    """/tokenize: a text prompt (tokenised as /v1/completions does) or chat messages (as chat does)."""

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadRequest(400, "give either prompt (a string) or messages (a chat), not both or neither")


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


def first_error(errors: list[Any]) -> tuple[str, str | None]:
    """The first problem as `field: reason` (clients show one line best)."""
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [_name(str(x)) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = "unknown field" if err.get("type") == "extra_forbidden" else str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


def parse_request(body: bytes, model: type[RequestBody]) -> Any:
    """The request from its JSON body, validated; BadRequest naming the field otherwise. Runs off the loop."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest(400, "the request body nests too deeply") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of thousands of digits
        raise BadRequest(400, f"the request body is not valid JSON: {one_line(str(e))}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    data = model.precheck(data)
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(400, *first_error(e.errors(include_url=False))) from None
    req.check()
    return req

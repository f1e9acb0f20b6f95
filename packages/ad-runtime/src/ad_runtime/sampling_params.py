"""User-facing sampling parameters of one request, validated in full before the request reaches the engine."""

import math
from dataclasses import dataclass, field, replace

from .structured_output import StructuredOutputParams

# torch.Generator.manual_seed takes any value that fits 64 bits unsigned.
MAX_SEED = 2**64 - 1
# Temperatures below this sample from a distribution that is argmax in all but name; dividing logits by
# them overflows to inf (and softmax to NaN), so they are treated as greedy (vLLM does the same).
GREEDY_EPS = 1e-5
# A bound far above any context length, so a count never overflows a 64-bit tensor downstream.
MAX_COUNT = 2**31 - 1
# Choices per prompt (OpenAI's own limit): each is a full request in the engine.
MAX_N = 128
# Top logprobs per token (OpenAI chat allows 20; vLLM's default max_logprobs is 20 too).
MAX_LOGPROBS = 20
# OpenAI's ranges for the additive penalties and for logit_bias values.
MAX_PENALTY = 2.0
MAX_BIAS = 100.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy.

    Every field is checked when the object is made: a bad value raises ValueError naming the field, so a
    bad request fails in its caller's hands and never inside a batch shared with other requests.
    """

    max_tokens: int = 100
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # The output follows a JSON schema, a regex, ... (StructuredOutputParams or a dict of its fields).
    structured_output: StructuredOutputParams | None = None
    # Keep stop strings in the returned text (they are cut by default).
    include_stop_str_in_output: bool = False
    # Independent sequences of the same prompt; LLM.generate and the server run each as its own request.
    n: int = 1
    # Top logprobs returned per generated token, next to the sampled token's own (0: only the sampled one's);
    # None: no logprobs. They are the log-softmax of the model's raw logits (before penalties and temperature).
    logprobs: int | None = None
    # OpenAI semantics on the counts of generated tokens: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face / vLLM semantics on tokens seen in the prompt or the output: a positive logit is divided by
    # it, a negative one multiplied (> 1 discourages repetition, 1 is off).
    repetition_penalty: float = 1.0
    # Token id -> value added to its logit (OpenAI: -100 bans a token, +100 forces it).
    logit_bias: dict[int, float] | None = None
    # End tokens and stop_token_ids cannot be sampled before this many tokens were generated.
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.stop is None or isinstance(self.stop, str):
            self.stop = [] if self.stop is None else [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and 0 <= t <= MAX_COUNT for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of token ids (ints >= 0), got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_COUNT:
            raise ValueError(f"max_tokens must be an int in [1, {MAX_COUNT}], got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_COUNT):
            raise ValueError(f"top_k must be an int >= 0 (0 or None: off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:  # NaN fails both comparisons
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise ValueError(f"seed must be an int in [0, 2**64-1] or None, got {self.seed!r}")
        if self.structured_output is not None:
            try:
                self.structured_output = StructuredOutputParams.coerce(self.structured_output)
            except ValueError as e:
                raise ValueError(f"structured_output: {e}") from None
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_extended()

    def _check_extended(self) -> None:
        """n, logprobs, penalties, logit_bias and min_tokens."""
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:  # NaN fails the comparison
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not math.isfinite(rp) or rp <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off), got {rp!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for tok, bias in self.logit_bias.items():
                if not _is_int(tok) or not 0 <= tok <= MAX_COUNT:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {tok!r}")
                if not _is_number(bias) or not -MAX_BIAS <= bias <= MAX_BIAS:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for {tok}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= MAX_COUNT:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Penalties that need the counts of the request's tokens."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before sampling (penalties, bias, min_tokens); plain rows skip all of it."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0

    def for_choices(self) -> list["SamplingParams"]:
        """One n=1 copy per choice. With a seed, choice i gets seed + i (mod 2**64, as vLLM derives them): the
        choices draw different streams, and the same request gives the same n answers every time."""
        if self.n == 1:
            return [self]
        return [replace(self, n=1, seed=None if self.seed is None else (self.seed + i) % (MAX_SEED + 1))
                for i in range(self.n)]

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "SamplingParams":
        """Build from a free-form dict (e.g. prompt.sp_kwargs); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

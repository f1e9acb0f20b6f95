"""User-facing sampling parameters of one request, validated in full before the request reaches the engine."""

import math
from dataclasses import dataclass, field

from .structured_output import StructuredOutputParams

# torch.Generator.manual_seed takes any value that fits 64 bits unsigned.
MAX_SEED = 2**64 - 1
# Temperatures below this sample from a distribution that is argmax in all but name; dividing logits by
# them overflows to inf (and softmax to NaN), so they are treated as greedy (vLLM does the same).
GREEDY_EPS = 1e-5
# A bound far above any context length, so a count never overflows a 64-bit tensor downstream.
MAX_COUNT = 2**31 - 1


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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "SamplingParams":
        """Build from a free-form dict (e.g. prompt.sp_kwargs); unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

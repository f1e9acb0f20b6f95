"""What `LLM.generate` returns: one RequestOutput per prompt, with its n choices (text, token ids, logprobs)."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "error" or None while running
    # With SamplingParams.logprobs: per token of token_ids, {token id: logprob} holding the sampled token and the
    # top `logprobs` tokens (log-softmax of the model's raw logits); None when not asked for.
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

"""One request's state as it moves through the executor: tokens, progress, stop checks."""

import enum
import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    """A prompt and what has been generated for it so far.

    Compared by identity: the scheduler's `in` and `remove` on its queues must not compare token lists
    field by field (that made scheduling 256 running requests take 24 ms a step on an H200 host).
    """

    request_id: int
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose k/v sit in the cache; reset to 0 when the request is preempted.
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    # Prompt tokens found in the prefix cache at the first admission (reported as cached prompt tokens).
    num_cached_tokens: int = 0
    # Prefix caching: keys of the sequence's full pages in token order (a hash chain), extended as pages fill.
    page_keys: list[bytes] = field(default_factory=list)
    # Prefix caching: how many of its leading full pages the scheduler offered to the cache since admission.
    num_offered_pages: int = 0
    # Row of the per-sequence state caches (Mamba conv/SSM state) while running; None while waiting.
    slot: int | None = None
    # Text of the output (filled by the detokenizer).
    text: str = ""
    # Overlapped scheduling: rows of sampled tokens still on the device (oldest first). The next step feeds
    # the newest as a placeholder -(row + 1) that the runner resolves on the device; the host reads them a
    # step late and moves them into output_token_ids.
    future: list[int] = field(default_factory=list)
    # Per output token, {token id: logprob} (the sampled token and the top params.logprobs); None: not asked for.
    logprobs: list[dict[int, float]] | None = None

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt, output, then placeholders of tokens not read back yet."""
        return self.prompt_token_ids + self.output_token_ids + [-(row + 1) for row in self.future]

    def token_ids(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without building the whole list: a decode step feeds one token, and
        concatenating every request's prompt and output each step cost the host milliseconds at 256 rows."""
        prompt, out = self.prompt_token_ids, self.output_token_ids
        p = len(prompt)
        if end <= p:
            return prompt[start:end]
        known = p + len(out)
        if start >= known:
            return [-(row + 1) for row in self.future[start - known : end - known]]
        if start >= p and end <= known:
            return out[start - p : end - p]
        return self.all_token_ids[start:end]

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has, counting those still on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.future)

    @property
    def num_known_tokens(self) -> int:
        """Tokens the host has read (prompt + output)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to be fed to the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.FAILED)

    def finish(self, reason: str) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()

    def fail(self, message: str) -> None:
        self.status = RequestStatus.FAILED
        self.finish_reason = "error"
        self.error = message
        self.finish_time = time.perf_counter()

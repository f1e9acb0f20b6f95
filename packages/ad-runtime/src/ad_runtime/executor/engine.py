"""The step loop: schedule, prepare inputs, run the model, sample on the device, post-process, free."""

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..sampling_params import SamplingParams
from .detokenizer import Detokenizer
from .request import Request, RequestStatus
from .sampler import Sampler
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class StepSequence:
    """One sequence of a step as the model runner sees it."""

    token_ids: list[int]  # tokens fed this step
    input_pos: int  # tokens of this sequence already in the cache
    pages: list[int]  # its page table
    slot: int = -1  # its row in per-sequence state caches (Mamba conv/SSM state); -1: none assigned


class ModelRunner(Protocol):
    """Runs the compiled model on one flattened batch and returns each sequence's last-token logits."""

    device: torch.device

    def forward(self, batch: Sequence[StepSequence], num_prefill: int) -> torch.Tensor: ...


class Engine:
    """Owns requests and drives one model runner with continuous batching."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Any | None,
        max_seq_len: int,
        eos_token_ids: list[int],
        max_input_len: int | None = None,
        vocab_size: int | None = None,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.detok = Detokenizer(tokenizer)
        self.max_seq_len = max_seq_len
        self.max_input_len = max_input_len or max_seq_len
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.sampler = Sampler(runner.device)
        self._ids = itertools.count()
        self.num_steps = 0

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """Queue a request; one that can never fit fails alone, at once, with a clear message."""
        req = Request(request_id=next(self._ids), prompt_token_ids=list(prompt_token_ids), params=params, prompt=prompt)
        n = len(req.prompt_token_ids)
        if n == 0:
            req.fail("the prompt is empty")
        elif self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in req.prompt_token_ids):
            # An out-of-range id would crash the embedding kernel on a GPU and take every request down.
            bad = next(t for t in req.prompt_token_ids if not 0 <= t < self.vocab_size)
            req.fail(f"the prompt has token id {bad}, outside the model's vocabulary of {self.vocab_size}")
        elif n >= self.max_seq_len:
            req.fail(f"the prompt has {n} tokens, max_seq_len is {self.max_seq_len}: raise max_seq_len or shorten it")
        elif n > self.max_input_len:
            req.fail(f"the prompt has {n} tokens, max_input_len is {self.max_input_len}: raise it or shorten the prompt")
        elif not self.scheduler.fits_at_all(req, min(n + params.max_tokens, self.max_seq_len)):
            req.fail(f"the request needs more KV-cache pages than exist ({self.scheduler.num_pages})")
        else:
            self.scheduler.add(req)
        return req

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Request]:
        """Run one step; returns the requests that produced a token or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work:
                raise RuntimeError("scheduler made no progress: no request fits the KV cache")
            return []
        pool = self.scheduler.pool
        seqs = []
        for s in batch:
            r = s.request
            start = r.num_computed_tokens
            seqs.append(StepSequence(
                r.all_token_ids[start : start + s.num_new_tokens], start, pool.page_table(r.request_id), r.slot
            ))
        num_prefill = sum(not s.is_decode for s in batch)
        logits = self.runner.forward(seqs, num_prefill)
        self.num_steps += 1
        sample_rows = [i for i, s in enumerate(batch) if s.completes_prompt]
        for s in batch:
            s.request.num_computed_tokens += s.num_new_tokens
        if not sample_rows:
            return []
        reqs = [batch[i].request for i in sample_rows]
        rows = logits if len(sample_rows) == len(batch) else logits[torch.tensor(sample_rows, device=logits.device)]
        tokens = self.sampler(rows, [r.params for r in reqs], [r.request_id for r in reqs]).tolist()  # the one sync
        now = time.perf_counter()
        for req, tok in zip(reqs, tokens):
            self._append(req, int(tok), now)
        return reqs

    def _append(self, req: Request, token: int, now: float) -> None:
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
            req.output_token_ids.pop()  # the end token is not part of the answer
        elif token in p.stop_token_ids:
            reason = "stop"
        if reason is None and p.stop and self.detok.update(req) is not None:
            reason = "stop"
        if reason is None and (len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            if not p.stop:
                req.text = self.detok.decode(req.output_token_ids, p.skip_special_tokens)
            req.finish(reason)
            self.scheduler.finish(req)
            self.sampler.release(req.request_id)

    def abort(self, req: Request, message: str) -> None:
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        self.scheduler.finish(req)
        req.fail(message)

    def run_until_done(self, requests: list[Request]) -> None:
        while any(r.status in (RequestStatus.WAITING, RequestStatus.RUNNING) for r in requests):
            self.step()

"""The step loop: schedule, prepare inputs, run the model, sample on the device, post-process, free.

A failure is contained: what belongs to one request fails that request alone, and after any error the
scheduler, pages, state slots and sampler generators are consistent for the next step.
"""

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..kv_cache.interface import StepSequence
from ..sampling_params import SamplingParams
from .detokenizer import Detokenizer
from .device_tensor import device_tensor
from .errors import one_line
from .launched_step import HostTokens, LaunchedStep
from .logprobs import TokenLogprobs
from .request import Request
from .sampler import Sampler
from .scheduler import Scheduler
from .step_timer import StepTimer
from .structured_output import GrammarMasks

logger = logging.getLogger(__name__)


class ModelRunner(Protocol):
    """Runs the compiled model on one flattened batch and returns each sequence's last-token logits.

    With overlapped scheduling a token id may be a placeholder -(row + 1): the runner replaces it on the
    device by `future[row]` (the previous step's sampled tokens) before the model reads its inputs; only
    runners that take `future` are used with overlap.

    A runner may also set `last_greedy`: the argmax of the logits it just returned, one per sequence, computed
    on the device with them (inside a CUDA graph); greedy batches then take it instead of sampling.
    """

    device: torch.device

    def forward(self, batch: Sequence[StepSequence], num_prefill: int, future: torch.Tensor | None = None
                ) -> torch.Tensor: ...


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
        overlap: bool = False,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.detok = Detokenizer(tokenizer)
        self.max_seq_len = max_seq_len
        self.max_input_len = max_input_len or max_seq_len
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.sampler = Sampler(runner.device, eos_token_ids)
        self._ids = itertools.count()
        # Prompt tokens the model computed (a preempted request's count again); the prefix cache's hits are not.
        self.num_prompt_tokens_computed = 0
        # Prompt tokens looked up in the prefix cache and found there (hit rate), for metrics.
        self.prefix_cache_stats = scheduler.prefix_stats
        self.timer: StepTimer | None = None  # set by benchmarks: per-phase step times and GPU idle share
        # Overlapped scheduling: prepare and launch step N+1 before reading step N's tokens (see step()).
        self.overlap = overlap
        self._inflight: LaunchedStep | None = None
        self._host_tokens = HostTokens(scheduler.max_batch_size, torch.device(runner.device))
        # Structured output: grammar matchers of constrained requests (xgrammar is loaded on the first one).
        self.grammars = GrammarMasks(tokenizer, vocab_size, eos_token_ids, scheduler.max_batch_size)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """Queue a request; one that can never run fails alone, at once, with a clear message."""
        req = Request(request_id=next(self._ids), prompt_token_ids=list(prompt_token_ids), params=params, prompt=prompt)
        if isinstance(params, SamplingParams) and params.logprobs is not None:
            req.logprobs = []
        try:
            problem = self._admission_problem(req)
            if problem is None:
                # A seeded generator is made now, so a seed torch refuses fails this request, not a later step.
                self.sampler.generator_for(req.request_id, params.seed)
                if params.structured_output is not None:
                    self.grammars.add(req.request_id, params.structured_output)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with one request fails that request only
            problem = f"invalid request: {one_line(e)}"
        if problem is None:
            self.scheduler.add(req)
        else:
            self.abort(req, problem)
        return req

    def _admission_problem(self, req: Request) -> str | None:
        """Why a request can never run, or None."""
        params = req.params
        if not isinstance(params, SamplingParams):
            return f"sampling parameters must be SamplingParams, got {type(params).__name__}"
        if params.n != 1:
            return f"n is {params.n}: the engine runs one sequence per request (submit params.for_choices() apiece)"
        if self.vocab_size is not None and params.logit_bias:
            bad = next((t for t in params.logit_bias if t >= self.vocab_size), None)
            if bad is not None:
                return f"logit_bias has token id {bad}, outside the model's vocabulary of {self.vocab_size}"
        ids = req.prompt_token_ids
        n = len(ids)
        if n == 0:
            return "the prompt is empty"
        bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            return f"the prompt has token id {bad!r}, which is not an int"
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in ids):
            # An out-of-range id would crash the embedding kernel on a GPU and take every request down.
            bad = next(t for t in ids if not 0 <= t < self.vocab_size)
            return f"the prompt has token id {bad}, outside the model's vocabulary of {self.vocab_size}"
        if n >= self.max_seq_len:
            return f"the prompt has {n} tokens, max_seq_len is {self.max_seq_len}: raise max_seq_len or shorten it"
        if n > self.max_input_len:
            return f"the prompt has {n} tokens, max_input_len is {self.max_input_len}: raise it or shorten the prompt"
        if not self.scheduler.chunked and n > self.scheduler.max_num_tokens:
            return (f"the prompt has {n} tokens, more than max_num_tokens ({self.scheduler.max_num_tokens}) "
                    "without chunked prefill: raise max_num_tokens or enable_chunked_prefill")
        if not self.scheduler.fits_at_all(min(n + params.max_tokens, self.max_seq_len)):
            return f"the request needs more KV-cache pages than exist ({self.scheduler.num_pages})"
        return None

    @property
    def has_unfinished(self) -> bool:
        """Requests wait or run, or a launched step still holds tokens of an unfinished request."""
        inflight = self._inflight
        return self.scheduler.has_work or (inflight is not None and any(not r.is_finished for r in inflight.reqs))

    def step(self) -> list[Request]:
        """Run one step; returns the requests that produced a token, finished or failed.

        Without overlap: schedule, run, sample, read the tokens, post-process. With overlap (`self.overlap`):
        schedule and launch step N+1 first (its inputs take step N's sampled tokens straight from the device),
        then read step N's tokens (the GPU is already busy with N+1) and post-process them.

        An error that belongs to one request (its sampling, its stop check, its text) fails that request
        alone; an error of the model itself fails the requests of its step. Either way their pages, state
        slots and generators are freed, so the next step starts from a consistent engine.
        """
        timer = self.timer
        if timer is not None:
            timer.begin()
        changed: list[Request] = []
        prev = self._inflight
        if prev is not None and self.grammars.active:
            # A constrained row's mask needs every earlier token in its matcher, so the step in flight is read
            # before this one is scheduled: while constrained requests run, steps do not overlap (all rows wait,
            # which keeps one simple rule: the mask of step N+1 always sees step N's token).
            self._inflight = None
            changed += self._resolve(prev)
            prev = None
        # A request whose last sampled token reaches its length limit finishes when that token is read: it
        # needs no further row. (Stops and end tokens cannot be foreseen: such a row is computed and dropped.)
        done = set() if prev is None else {id(r) for r in prev.reqs if self._reaches_limit(r)}
        batch = self.scheduler.schedule(skip=done)
        launched = None
        if batch:
            launched = self._launch(batch, prev, changed)
        elif prev is None and self.scheduler.waiting and not self.scheduler.running:
            # Nothing runs and the oldest waiting request still cannot be scheduled (a preempted request
            # that grew past max_num_tokens without chunked prefill): it never will, so it fails alone.
            req = self.scheduler.waiting[0]
            self.abort(req, "the request no longer fits one step (max_num_tokens) or the KV cache")
            return changed + [req]
        if self.overlap and not self.grammars.active:
            self._inflight = launched
            if prev is not None:
                changed += self._resolve(prev)
        elif launched is not None:
            changed += self._resolve(launched)
        if timer is not None:
            timer.mark("post")
            timer.end_step()
        return changed

    def set_overlap(self, on: bool) -> None:
        """Switch overlapped scheduling between steps (reads a step still in flight first)."""
        if self._inflight is not None:
            self._resolve(self._inflight)
            self._inflight = None
        self.overlap = on

    def _reaches_limit(self, req: Request) -> bool:
        n_out = len(req.output_token_ids) + len(req.future)
        return n_out >= req.params.max_tokens or req.num_tokens >= self.max_seq_len

    def _launch(self, batch: list, prev: LaunchedStep | None, failed: list[Request]) -> LaunchedStep | None:
        """Run the model on `batch` and start sampling; tokens stay on the device (read in `_resolve`)."""
        timer = self.timer
        pool = self.scheduler.pool
        seqs = []
        num_prefill = 0  # counted in the same pass
        for s in batch:
            r, n = s.request, s.num_new_tokens
            start = r.num_computed_tokens
            num_prefill += not s.is_decode
            seqs.append(StepSequence(r.token_ids(start, start + n), start, pool.page_table(r.request_id), r.slot))
        if timer is not None:
            timer.start_step("mixed" if num_prefill else "decode", len(batch))
            timer.mark("schedule")
        future = prev.tokens if prev is not None and any(r.future for r in prev.reqs) else None
        try:
            logits = self.runner.forward(seqs, num_prefill, future) if future is not None else (
                self.runner.forward(seqs, num_prefill))
        except Exception as e:  # noqa: BLE001 - the model failed on this batch: its requests fail, the engine goes on
            logger.exception("the model failed on a step of %d sequences", len(batch))
            for s in batch:
                self.abort(s.request, f"engine step failed: {one_line(e)}")
                failed.append(s.request)
            return None
        if timer is not None:
            timer.mark("forward")
        sample_rows = []  # rows that complete their prompt, in the same pass (read before the count moves on)
        for i, s in enumerate(batch):
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            if start < len(r.prompt_token_ids):
                self.num_prompt_tokens_computed += min(end, len(r.prompt_token_ids)) - start
            if s.completes_prompt:
                sample_rows.append(i)
            r.num_computed_tokens = end
        if not sample_rows:
            if timer is not None:
                timer.device_work_queued()
            return None
        reqs = [batch[i].request for i in sample_rows]
        if len(sample_rows) == len(batch):
            rows, greedy = logits, getattr(self.runner, "last_greedy", None)  # see ModelRunner
        else:
            # device_tensor: a pageable copy would wait for this step's forward (every mixed step's host stalled)
            rows, greedy = logits[device_tensor(sample_rows, logits.device)], None
        launched = self._sample(rows, reqs, failed, greedy)
        if timer is not None:
            timer.device_work_queued()
            timer.mark("sample")
        for j, req in enumerate(launched.reqs):
            req.future.append(j)
        return launched

    def _sample(self, rows: torch.Tensor, reqs: list[Request], failed: list[Request],
                greedy: torch.Tensor | None = None) -> LaunchedStep:
        """Start sampling one token per row; a row whose sampling fails fails its request alone. `greedy`: the
        argmax of `rows` if the runner computed it already."""
        if self.grammars.active:
            rows, greedy = self._mask(rows, reqs, failed), None  # the masks change the argmax
        try:
            out = self.sampler.sample(rows, [r.params for r in reqs], [r.request_id for r in reqs],
                                      [r.prompt_token_ids for r in reqs], greedy)
            return LaunchedStep.start(reqs, out.tokens, self._host_tokens, out.logprobs)
        except Exception:  # noqa: BLE001 - find the culprit by sampling each row alone
            logger.exception("batched sampling failed; sampling row by row")
        good, picked = [], []
        for i, req in enumerate(reqs):
            try:
                picked.append(self.sampler.sample(rows[i : i + 1], [req.params], [req.request_id],
                                                  [req.prompt_token_ids]))
                good.append(req)
            except Exception as e:  # noqa: BLE001
                self.abort(req, f"sampling failed: {one_line(e)}")
                failed.append(req)
        tokens = torch.cat([p.tokens for p in picked]) if picked else torch.empty(0, dtype=torch.long,
                                                                                     device=rows.device)
        logprobs = TokenLogprobs.concat([p.logprobs for p in picked], [1] * len(picked))
        return LaunchedStep.start(good, tokens, self._host_tokens, logprobs)

    def _mask(self, rows: torch.Tensor, reqs: list[Request], failed: list[Request]) -> torch.Tensor:
        """Mask what constrained rows' grammars forbid (on the device); a row whose mask fails fails alone."""
        try:
            return self.grammars.apply(rows, [r.request_id for r in reqs])
        except Exception:  # noqa: BLE001 - find the culprit by masking each row alone
            logger.exception("structured-output masking failed; masking row by row")
        for i, req in enumerate(reqs):
            try:
                self.grammars.apply(rows[i : i + 1], [req.request_id])
            except Exception as e:  # noqa: BLE001 - its token is dropped when the step is read (it has failed)
                self.abort(req, f"structured output failed: {one_line(e)}")
                failed.append(req)
        return rows

    def _resolve(self, launched: LaunchedStep) -> list[Request]:
        """Read a launched step's tokens (waits for that step only) and post-process its requests."""
        tokens = launched.read()
        logprobs = {} if launched.logprobs is None else launched.logprobs.by_row(tokens)
        now = time.perf_counter()
        changed = []
        for j, (req, tok) in enumerate(zip(launched.reqs, tokens)):
            if req.is_finished:
                req.future.clear()  # finished or aborted while this step ran: its row is dropped
                continue
            req.future.pop(0)
            try:
                self._append(req, tok, now, logprobs.get(j))
            except Exception as e:  # noqa: BLE001 - e.g. a tokenizer that cannot decode this output
                logger.exception("post-processing request %d failed", req.request_id)
                self.abort(req, f"post-processing failed: {one_line(e)}")
            changed.append(req)
        return changed

    def _append(self, req: Request, token: int, now: float, logprobs: dict[int, float] | None = None) -> None:
        req.output_token_ids.append(token)
        if req.logprobs is not None:
            assert logprobs is not None, "a request that asked for logprobs got a row without them"
            req.logprobs.append(logprobs)
        if req.first_token_time is None:
            req.first_token_time = now
        p = req.params
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
            req.output_token_ids.pop()  # the end token is not part of the answer
            if req.logprobs is not None:
                req.logprobs.pop()
        elif token in p.stop_token_ids:
            reason = "stop"
        elif self.grammars.accept(req.request_id, token):  # the grammar has ended: nothing may follow
            reason = "stop"
            if token in self.eos_token_ids:  # ignore_eos: the grammar's end token still ends it, unseen
                req.output_token_ids.pop()
        stop_string = reason is None and bool(p.stop) and self.detok.update(req) is not None  # sets req.text
        if stop_string:
            reason = "stop"
        if reason is None and (len(req.output_token_ids) >= p.max_tokens or req.num_known_tokens >= self.max_seq_len):
            reason = "length"
        if reason is not None:
            if not stop_string:
                req.text = self.detok.decode(req.output_token_ids, p.skip_special_tokens)
            req.finish(reason)
            req.future.clear()  # a token sampled after this one (overlap) is not part of the answer
            self._release(req)

    def abort(self, req: Request, message: str) -> None:
        """End an unfinished request (waiting, running, or refused at admission); it fails with `message`."""
        if not req.is_finished:
            self._release(req)
            req.fail(message)

    def _release(self, req: Request) -> None:
        """Free the request's pages, state slot, generator and grammar matcher (it leaves the scheduler's queues)."""
        self.scheduler.finish(req)
        self.sampler.release(req.request_id)
        self.grammars.release(req.request_id)

    def abort_all(self, message: str) -> list[Request]:
        """Fail every unfinished request (after an error the engine cannot pin on one of them)."""
        reqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        for req in reqs:
            self.abort(req, message)
        return reqs

    def run_until_done(self, requests: list[Request]) -> None:
        while any(not r.is_finished for r in requests):
            self.step()


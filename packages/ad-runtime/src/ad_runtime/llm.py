"""The Python API: `LLM(model=..., **llm_args)` builds the engine; `generate` runs prompts through it."""

import gc
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .outputs import CompletionOutput, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from ad_config import LlmArgs

logger = logging.getLogger(__name__)

PromptLike = str | list[int] | list[dict[str, Any]]


class LLM:
    """A compiled model serving many prompts at once with continuous batching.

    Every `LlmArgs` field is accepted as a keyword (an unknown keyword is a ConfigError).
    `model=None` runs the bundled SmolLM2-135M-Instruct.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        from ad_config import load_llm_args

        if model is not None:
            kwargs["model"] = model
        self._init_from_args(load_llm_args(**kwargs))

    @classmethod
    def from_args(cls, args: "LlmArgs") -> "LLM":
        """Build from an already resolved LlmArgs (e.g. ExperimentConfig.args)."""
        self = cls.__new__(cls)
        self._init_from_args(args)
        return self

    def _init_from_args(self, args: "LlmArgs") -> None:
        from .build import build_engine_backend

        self._closed = True  # until the backend exists, there is nothing to shut down
        self.args = args
        self._backend = build_engine_backend(self.args)
        self.tokenizer = self._backend.tokenizer
        self._closed = False
        # The model, torch and transformers leave ~400,000 long-lived objects: each full garbage collection while
        # generating scans them all (~0.27 s on the development VM, about once per 500 steps of a 256-row run).
        # Frozen, the collector skips them until shutdown() unfreezes them (then the model can be collected).
        gc.freeze()

    @property
    def engine(self) -> Any:
        """The step engine (single-process runs and rank 0 of distributed runs)."""
        return self._backend.engine

    @property
    def backend(self) -> Any:
        """The request-level backend: LocalBackend (one process) or DistributedBackend (world_size > 1 or
        engine_process: its submit/abort/health talk to rank 0)."""
        return self._backend

    @property
    def build_reports(self) -> list[Any]:
        """How each rank's graph was built (`build.BuildReport`: seconds, build cache hit/miss/off), in rank order."""
        return list(self._backend.build_reports)

    @property
    def core(self) -> Any:
        """The thread-safe engine core (submit, abort, step) of a single-process run; None when the engine runs
        in another process."""
        return getattr(self._backend, "core", None)

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    # ---- prompts ----------------------------------------------------------------------------------

    def encode(self, prompt: PromptLike, chat_template: bool = False) -> tuple[list[int], str | None]:
        """Token ids of a prompt: a string, a token-id list, or a chat-message list.

        Text that cannot be encoded (a lone surrogate, say) is a ValueError here, before any engine sees it.
        """
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
            if chat_template:
                return self.encode([{"role": "user", "content": prompt}])
            return self._need_tokenizer().encode(prompt), prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt), None
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if isinstance(m.get("content"), str):
                    _check_text(m["content"], f"message {i} content")
            tok = self._need_tokenizer()
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return tok.encode(text, add_special_tokens=False), text
        raise TypeError("a prompt must be a string, a list of token ids or a list of chat messages, got "
                        f"{type(prompt).__name__}")

    def uses_chat_template(self, chat_template: bool | None) -> bool:
        """None (the default of generate): apply the tokenizer's chat template to plain strings when it has one."""
        if chat_template is None:
            return bool(getattr(self.tokenizer, "chat_template", None))
        return chat_template

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer (skip_tokenizer_init=True): pass token-id lists")
        return self.tokenizer

    # ---- generation -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptLike | Sequence[PromptLike],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template: bool | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together; returns one output per prompt, in order.

        Plain-string prompts go through the tokenizer's chat template when it has one (`chat_template=None`,
        as build_and_run_ad does); `chat_template=False` feeds them as raw text. Safe to call from several
        threads at once: their requests share the engine's batches.
        """
        prompts = self._as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        template = self.uses_chat_template(chat_template)
        encoded = [self.encode(p, template) for p in prompts]
        # A prompt with n choices is n requests of the engine, each with its own random stream (see for_choices).
        choices = [sp.for_choices() for sp in params]
        flat = [(e, c) for e, cs in zip(encoded, choices) for c in cs]
        reqs = self._backend.generate([e[0] for e, _ in flat], [c for _, c in flat], [e[1] for e, _ in flat])
        outs, start = [], 0
        for (ids, _), cs in zip(encoded, choices):
            outs.append(self._output(reqs[start : start + len(cs)], ids))
            start += len(cs)
        return outs

    def generate_stream(
        self, prompt: PromptLike, sampling_params: SamplingParams | None = None, chat_template: bool | None = None
    ) -> Iterator[RequestOutput]:
        """Yield the growing output of one prompt after every new token (chat template as in `generate`).

        With n > 1 every yield holds all n choices as they stand; the choices advance in the same engine steps.
        """
        ids, text = self.encode(prompt, self.uses_chat_template(chat_template))
        params = sampling_params or self._params_for([prompt], None)[0]
        streams = [self._backend.stream(ids, sp, text) for sp in params.for_choices()]
        latest: list[Any] = [None] * len(streams)
        try:
            while any(r is None or not r.is_finished for r in latest):
                for i, stream in enumerate(streams):
                    if latest[i] is None or not latest[i].is_finished:
                        # Steps the shared engine until choice i has news; the other choices advance meanwhile.
                        latest[i] = next(stream)
                yield self._output(latest, ids)
        finally:
            for stream in streams:  # a caller that stops early aborts the choices still running
                stream.close()

    def _as_list(self, prompts: Any) -> list[PromptLike]:
        """One prompt (a string, a token-id list, a chat-message list) as a list of one; else the prompts."""
        one = isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and (
            all(isinstance(t, int) for t in prompts) or all(isinstance(m, dict) for m in prompts)))
        return [prompts] if one else list(prompts)

    def _params_for(self, prompts: list, sp: Any) -> list[SamplingParams]:
        if sp is None:
            # LlmArgs.sampling holds the defaults for requests that bring no parameters of their own.
            defaults = self.args.sampling.model_dump() if hasattr(self.args, "sampling") else {}
            return [SamplingParams(**defaults) for _ in prompts]
        if isinstance(sp, SamplingParams):
            return [sp for _ in prompts]
        sp = list(sp)
        if len(sp) != len(prompts):
            raise ValueError(f"got {len(sp)} sampling params for {len(prompts)} prompts")
        bad = next((p for p in sp if not isinstance(p, SamplingParams)), None)
        if bad is not None:
            raise TypeError(f"sampling params must be SamplingParams, got {type(bad).__name__}")
        return sp

    def _output(self, reqs: list[Any], prompt_ids: list[int]) -> RequestOutput:
        """One prompt's output from the engine requests of its choices (index i: the i-th request)."""
        outputs = []
        for i, req in enumerate(reqs):
            text = req.text
            if not text and req.output_token_ids and self.tokenizer is not None:
                text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=req.params.skip_special_tokens)
            logprobs = None if req.logprobs is None else list(req.logprobs)
            outputs.append(CompletionOutput(i, text, list(req.output_token_ids), req.finish_reason, logprobs))
        first_times = [r.first_token_time for r in reqs if r.first_token_time is not None]
        finish_times = [r.finish_time for r in reqs]
        return RequestOutput(
            request_id=reqs[0].request_id,
            prompt=reqs[0].prompt,
            prompt_token_ids=list(prompt_ids),
            outputs=outputs,
            finished=all(r.is_finished for r in reqs),
            error=next((r.error for r in reqs if r.error), None),
            metrics=RequestMetrics(
                min(r.arrival_time for r in reqs), min(first_times, default=None),
                None if None in finish_times else max(finish_times), sum(r.num_preemptions for r in reqs)),
        )

    # ---- lifetime ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.shutdown()
            gc.unfreeze()  # what the build froze (and whatever was frozen since) is collectable again

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down
            pass


def _check_text(text: str, what: str) -> None:
    """Text must be valid Unicode (no lone surrogates): tokenizers fail on it deep inside their native code."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {what} is not valid Unicode text ({e.reason} at position {e.start})") from None

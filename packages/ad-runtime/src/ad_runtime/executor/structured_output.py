"""Structured output in the engine: per request a grammar matcher, a token bitmask before sampling, each token accepted.

xgrammar is imported on the first constrained request. The tokenizer's vocabulary is read once (per engine, so
per LLM); grammars are compiled once per constraint (cached by `StructuredOutputParams.key`); every constrained
request gets its own matcher, which the engine advances by each token it reads.
"""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ..structured_output import StructuredOutputParams, grammar_error

# Compiled grammars kept for reuse (a JSON schema's compiled form is small: tens of KiB to a few MiB).
MAX_CACHED_GRAMMARS = 64


class GrammarMasks:
    """The grammar matchers of the engine's constrained requests, keyed by request id."""

    def __init__(self, tokenizer: Any | None, vocab_size: int | None, stop_token_ids: Sequence[int], max_rows: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._max_rows = max_rows
        self._info: Any = None
        self._compiler: Any = None
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._matchers: dict[int, Any] = {}
        self._bitmask: torch.Tensor | None = None  # [max_rows, ceil(vocab / 32)] int32 on the host, reused

    @property
    def active(self) -> bool:
        """Some unfinished request is constrained."""
        return bool(self._matchers)

    def add(self, request_id: int, params: StructuredOutputParams) -> None:
        """Start a matcher for the request (compiling its grammar unless cached); ValueError if it cannot."""
        import xgrammar as xgr

        compiled = self._compile(params)
        self._matchers[request_id] = xgr.GrammarMatcher(compiled)

    def release(self, request_id: int) -> None:
        self._matchers.pop(request_id, None)

    def accept(self, request_id: int, token: int) -> bool:
        """Advance the request's matcher by `token`; True when the grammar has ended (nothing may follow).

        Only tokens the mask allowed are sampled, so a refused token means a bug or a corrupted matcher:
        a ValueError that fails this request.
        """
        matcher = self._matchers.get(request_id)
        if matcher is None:
            return False
        if not matcher.accept_token(token):
            raise ValueError(f"token {token} does not follow the request's structured-output grammar")
        return matcher.is_terminated()

    def apply(self, logits: torch.Tensor, request_ids: Sequence[int]) -> torch.Tensor:
        """Mask, in place and on the logits' device, the tokens each constrained row's grammar forbids next.

        `logits` [B, V] holds one row per request of `request_ids`; unconstrained rows are left as they are.
        The matcher of a row must have seen every earlier token of its request (the engine does not overlap
        steps while constrained requests run).
        """
        import xgrammar as xgr

        rows = [i for i, rid in enumerate(request_ids) if rid in self._matchers]
        if not rows:
            return logits
        bitmask = self._host_bitmask()[: len(request_ids)]
        for i in rows:
            self._matchers[request_ids[i]].fill_next_token_bitmask(bitmask, i)
        # Non-blocking from pinned memory: the buffer is filled again only after this step's tokens are read,
        # which waits for the sampling that follows this copy.
        mask = bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, indices=rows)
        return logits

    def _host_bitmask(self) -> torch.Tensor:
        if self._bitmask is None:
            import xgrammar as xgr

            info = self._tokenizer_info()
            bitmask = xgr.allocate_token_bitmask(self._max_rows, info.vocab_size)
            self._bitmask = bitmask.pin_memory() if torch.cuda.is_available() else bitmask
        return self._bitmask

    def _tokenizer_info(self) -> Any:
        if self._info is None:
            import xgrammar as xgr

            if self._tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer (the LLM was made without one)")
            # vocab_size: the model's logits may be wider than the tokenizer's vocabulary; ids past it are masked.
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids or None
            )
            # Our own cache below keys grammars by constraint; xgrammar's would hold a second copy.
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            self._info = info
        return self._info

    def _compile(self, params: StructuredOutputParams) -> Any:
        key = params.key
        compiled = self._compiled.get(key)
        if compiled is not None:
            self._compiled.move_to_end(key)
            return compiled
        self._tokenizer_info()
        try:
            compiled = self._compiler.compile_grammar(params.grammar())
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError with its C++ message
            raise ValueError(f"structured output: {grammar_error(e)}") from None
        self._compiled[key] = compiled
        if len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return compiled

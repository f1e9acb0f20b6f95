"""Edits of the logits before sampling: logit_bias, min_tokens and the repetition/presence/frequency penalties.

Everything is batched tensor work on the device, and only rows whose parameters ask for it are touched: a batch of
plain requests pays nothing. The penalties need each request's token counts; they live on the device in one
table (a row per penalised request), updated right after each sampling from the sampled ids still on the device,
so overlapped scheduling (where the host reads a token a step late) sees the same counts as the synchronous engine.
"""

from collections.abc import Sequence

import torch

from ..sampling_params import SamplingParams
from .device_tensor import device_tensor


class LogitsProcessor:
    """Applies bias, min_tokens and penalties to the rows that ask for them; owns the per-request token counts."""

    def __init__(self, device: torch.device | str, eos_token_ids: Sequence[int] = ()):
        self.device = torch.device(device)
        self.eos_token_ids = sorted(set(eos_token_ids))
        # Request id -> its row of the count tables (penalised requests only, from their first sampling on).
        self._rows: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._output_counts: torch.Tensor | None = None  # [rows, vocab] int32: how often each token was generated
        self._in_prompt: torch.Tensor | None = None  # [rows, vocab] bool: which tokens the prompt holds
        # Tokens sampled so far per request with min_tokens (the host knows this count exactly, also with overlap).
        self._num_sampled: dict[int, int] = {}

    def release(self, request_id: int) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)
        self._num_sampled.pop(request_id, None)

    def apply(self, logits: torch.Tensor, params: Sequence[SamplingParams], request_ids: Sequence[int],
              prompts: Sequence[Sequence[int]] | None) -> torch.Tensor:
        """The processed logits [B, V] (a new tensor; `logits` itself when no row asks for anything)."""
        rows = [i for i, p in enumerate(params) if p.processes_logits]
        if not rows:
            return logits
        out = logits.clone()
        vocab = out.shape[-1]
        for i in rows:
            bad = next((t for t in params[i].logit_bias or () if t >= vocab), None)
            if bad is not None:  # the engine refuses these at admission; a direct caller gets a clear error
                raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary ({vocab})")
        self._apply_bias(out, rows, params)
        self._apply_min_tokens(out, rows, params, request_ids)
        pen = [i for i in rows if params[i].has_penalties]
        if pen:
            if any(params[i].repetition_penalty != 1 for i in pen) and prompts is None:
                raise ValueError("repetition_penalty needs the prompts' token ids")
            table = self._table_rows([request_ids[i] for i in pen], [prompts[i] if prompts else () for i in pen], vocab)
            idx = device_tensor(pen, out.device)
            out[idx] = apply_penalties(
                out.index_select(0, idx), self._output_counts.index_select(0, table),
                self._in_prompt.index_select(0, table),
                *(device_tensor([getattr(params[i], name) for i in pen], out.device, out.dtype)
                  for name in ("repetition_penalty", "presence_penalty", "frequency_penalty")))
        return out

    def record(self, params: Sequence[SamplingParams], request_ids: Sequence[int], tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (still on the device) for the requests that keep counts."""
        pen = [i for i, p in enumerate(params) if p.has_penalties and request_ids[i] in self._rows]
        if pen:
            table = device_tensor([self._rows[request_ids[i]] for i in pen], tokens.device)
            picked = tokens.index_select(0, device_tensor(pen, tokens.device))
            ones = torch.ones(len(pen), dtype=self._output_counts.dtype, device=tokens.device)
            self._output_counts.index_put_((table, picked), ones, accumulate=True)
        for i, p in enumerate(params):
            if p.min_tokens > 0:
                self._num_sampled[request_ids[i]] = self._num_sampled.get(request_ids[i], 0) + 1

    def _apply_bias(self, logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]) -> None:
        entries = [(i, tok, bias) for i in rows for tok, bias in (params[i].logit_bias or {}).items()]
        if entries:
            r, t, v = zip(*entries)
            dev = logits.device
            logits.index_put_((device_tensor(r, dev), device_tensor(t, dev)), device_tensor(v, dev, logits.dtype),
                              accumulate=True)

    def _apply_min_tokens(self, logits: torch.Tensor, rows: list[int], params: Sequence[SamplingParams],
                          request_ids: Sequence[int]) -> None:
        r, t = [], []
        vocab = logits.shape[-1]
        for i in rows:
            p = params[i]
            if p.min_tokens > self._num_sampled.get(request_ids[i], 0):
                stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids) | set(self.eos_token_ids)
                for tok in sorted(stops):
                    if tok < vocab:
                        r.append(i)
                        t.append(tok)
        if r:
            dev = logits.device
            logits.index_put_((device_tensor(r, dev), device_tensor(t, dev)), logits.new_full((), float("-inf")))

    def _table_rows(self, request_ids: list[int], prompts: list[Sequence[int]], vocab: int) -> torch.Tensor:
        """Rows of the count tables for these requests; a request's row is made (from its prompt) on first use."""
        for rid, prompt in zip(request_ids, prompts):
            if rid in self._rows:
                continue
            row = self._free_rows.pop() if self._free_rows else self._grow(vocab)
            self._rows[rid] = row
            self._output_counts[row].zero_()
            self._in_prompt[row].zero_()
            ids = [t for t in prompt if 0 <= t < vocab]
            if ids:
                self._in_prompt[row, device_tensor(ids, self.device)] = True
        return device_tensor([self._rows[rid] for rid in request_ids], self.device)

    def _grow(self, vocab: int) -> int:
        """Double the tables (rows are reused after release, so this happens a few times per engine at most)."""
        old = 0 if self._output_counts is None else self._output_counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, vocab, dtype=torch.int32, device=self.device)
        seen = torch.zeros(new, vocab, dtype=torch.bool, device=self.device)
        if old:
            counts[:old] = self._output_counts
            seen[:old] = self._in_prompt
        self._output_counts, self._in_prompt = counts, seen
        self._free_rows.extend(range(new - 1, old, -1))
        return old


def apply_penalties(logits: torch.Tensor, output_counts: torch.Tensor, in_prompt: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Penalised logits [R, V], one set of penalties per row ([R] each).

    repetition (Hugging Face, vLLM): a token seen in the prompt or the output has a positive logit divided by the
    penalty, a negative one multiplied by it. Then presence and frequency (OpenAI), on generated tokens only:
    logit -= frequency * count + presence * (count > 0).
    """
    counts = output_counts.to(logits.dtype)
    seen = in_prompt | (output_counts > 0)
    rep = repetition.unsqueeze(-1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency.unsqueeze(-1) * counts - presence.unsqueeze(-1) * (output_counts > 0).to(logits.dtype)

"""Token sampling on the device: logits processing, greedy, temperature, top-k and top-p with per-request seeds,
and logprobs of what was sampled."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams
from .device_tensor import device_tensor
from .logits_processing import LogitsProcessor
from .logprobs import TokenLogprobs, compute_logprobs


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64 on the device
    logprobs: TokenLogprobs | None  # the rows that asked for logprobs; None when none did


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) of [B, V] logits; on a GPU through two short Triton launches (torch's one
    reduction kernel took 36.8 us of an 8B batch-1 decode step on an H200, for 0.25 MB of logits)."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1:
        from ..kernels.triton.argmax import argmax_rows  # Triton only where a GPU runs the model

        return argmax_rows(logits)
    return torch.argmax(logits, dim=-1)


class Sampler:
    """Samples one token per row of a logits batch, each row with its own parameters."""

    def __init__(self, device: torch.device | str, eos_token_ids: Sequence[int] = ()):
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}
        self.processor = LogitsProcessor(self.device, eos_token_ids)

    def generator_for(self, request_id: int, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed)
            self._generators[request_id] = g
        return g

    def release(self, request_id: int) -> None:
        self._generators.pop(request_id, None)
        self.processor.release(request_id)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[int],
                 prompts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """logits [B, V] -> token ids [B] (int64, on the device)."""
        return self.sample(logits, params, request_ids, prompts).tokens

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[int],
               prompts: Sequence[Sequence[int]] | None = None, greedy: torch.Tensor | None = None) -> SamplerOutput:
        """One token per row, and the logprobs of the rows that ask. `prompts` (each row's prompt ids) is needed
        only by repetition_penalty, for the first sampling of a request. `greedy`: greedy_tokens(logits) when the
        caller has it already (a CUDA graph computed it with the logits); used for batches that are all greedy."""
        # Requests often share one SamplingParams object: each distinct one is checked once, not once per row.
        distinct = {id(p): p for p in params}.values()
        plain = not any(p.processes_logits or p.logprobs is not None for p in distinct)
        if plain and all(p.greedy for p in distinct):
            # Greedy picks straight from the model's logits: bf16 -> fp32 is exact, so the argmax (first of the
            # maxima) is the same, without writing and reading a float32 copy (256 rows x 128k vocab: 131 MB).
            return SamplerOutput(greedy_tokens(logits) if greedy is None else greedy, None)
        raw = logits.float()
        if plain:  # one pass for plain batches
            return SamplerOutput(self._pick(raw, params, request_ids, distinct), None)
        tokens = self._pick(self.processor.apply(raw, params, request_ids, prompts), params, request_ids, distinct)
        logprobs = compute_logprobs(raw, tokens, params)
        # Counted last: a failure above leaves the counts as they were, so a retry row by row counts once.
        self.processor.record(params, request_ids, tokens)
        return SamplerOutput(tokens, logprobs)

    def _pick(self, logits: torch.Tensor, params: list[SamplingParams], request_ids: list[int],
              distinct: Iterable[SamplingParams]) -> torch.Tensor:
        """`distinct`: the different objects among `params`."""
        out = greedy_tokens(logits)
        if all(p.greedy for p in distinct):
            return out
        rows = [i for i, p in enumerate(params) if not p.greedy]
        idx = device_tensor(rows, logits.device)
        sub = logits.index_select(0, idx)
        temps = device_tensor([params[i].temperature for i in rows], logits.device, torch.float32)
        sub = sub / temps.unsqueeze(-1)
        sub = _apply_top_k(sub, [params[i].top_k for i in rows])
        sub = _apply_top_p(sub, [params[i].top_p for i in rows])
        probs = torch.softmax(sub, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; lets each row use its own
        # generator (seeded requests) without a host sync.
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=self.generator_for(request_ids[i], params[i].seed))
        picked = torch.argmax(probs / noise, dim=-1)
        out[idx] = picked
        return out


def _apply_top_k(logits: torch.Tensor, top_ks: list[int | None]) -> torch.Tensor:
    vocab = logits.shape[-1]
    ks = [k if k and k > 0 else vocab for k in top_ks]
    if all(k >= vocab for k in ks):
        return logits
    k_t = device_tensor([min(k, vocab) for k in ks], logits.device)
    sorted_vals, _ = torch.sort(logits, dim=-1, descending=True)
    kth = sorted_vals.gather(-1, (k_t - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_ps):
        return logits
    p_t = device_tensor(top_ps, logits.device, logits.dtype).unsqueeze(-1)
    sorted_vals, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_vals, dim=-1)
    # Drop a token when the mass strictly before it already reaches top_p (keeps at least one).
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= p_t
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))

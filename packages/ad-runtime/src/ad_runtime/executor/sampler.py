"""Token sampling on the device: logits processing, greedy, temperature, top-k and top-p with per-request seeds,
and logprobs of what was sampled."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams
from . import flashinfer_sampling
from .device_tensor import device_tensor
from .graph_sampling import GraphSampling, cut_probs
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
        self.graphs = GraphSampling(self.device)
        flashinfer_sampling.start_loading(self.device)

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
        if (plain and self.graphs.applies(logits) and not any(p.greedy or p.seed is not None for p in distinct)
                and not flashinfer_sampling.can_draw(logits, any(p.top_p < 1.0 for p in distinct), False)):
            # A small batch where every row samples: one replay instead of the ~15 launches below (graph_sampling.py)
            vocab = logits.shape[-1]
            tokens = self.graphs.draw(logits, [p.temperature for p in params],
                                      [min(p.top_k, vocab) if p.top_k and p.top_k > 0 else vocab for p in params],
                                      [p.top_p for p in params])
            if tokens is not None:
                return SamplerOutput(tokens, None)
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
        if all(p.greedy for p in distinct):
            return greedy_tokens(logits)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        # A batch where every row samples (a served batch at one temperature) needs no argmax and no row gather.
        every_row = len(rows) == len(params)
        idx = None if every_row else device_tensor(rows, logits.device)
        sub = logits if idx is None else logits.index_select(0, idx)
        temps = [params[i].temperature for i in rows]
        if any(t != 1.0 for t in temps):
            sub = sub / device_tensor(temps, logits.device, torch.float32).unsqueeze(-1)
        picked = _draw(sub, [params[i].top_k for i in rows], [params[i].top_p for i in rows],
                       [self.generator_for(request_ids[i], params[i].seed) for i in rows])
        if idx is None:
            return picked
        out = greedy_tokens(logits)
        out[idx] = picked
        return out


# Up to this k, top-k alone takes a partial selection (torch.topk) instead of sorting the whole vocabulary.
TOPK_WITHOUT_SORT = 1024


def _draw(logits: torch.Tensor, top_ks: list[int | None], top_ps: list[float],
          generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(logits), cut to each row's top-k then top-p.

    Both cuts come from one sort, and the draw happens in sorted order (mapped back at the end): no scatter over
    the vocabulary, no second softmax. The draw is the exponential race, argmax(p / E) with E ~ Exp(1): it needs
    no normalised p (a cut token just gets p = 0) and no host sync, and each seeded row draws its own noise, over
    the vocabulary in token order. On a GPU with FlashInfer, a top-p batch without seeds is drawn by its
    sorting-free kernels instead (flashinfer_sampling.py)."""
    vocab = logits.shape[-1]
    ks = [min(k, vocab) if k and k > 0 else vocab for k in top_ks]
    cut_k, cut_p = any(k < vocab for k in ks), any(p < 1.0 for p in top_ps)
    seeded = [j for j, g in enumerate(generators) if g is not None]
    if flashinfer_sampling.can_draw(logits, cut_p, bool(seeded)):
        drawn = flashinfer_sampling.draw(logits, ks, top_ps, cut_k)
        if drawn is not None:
            return drawn
    order = None
    if cut_k and not cut_p and max(ks) <= TOPK_WITHOUT_SORT:
        # Top-k alone: the k-th value from a partial selection, the draw over the vocabulary; no sort.
        kth = torch.topk(logits, max(ks), dim=-1).values.gather(
            -1, device_tensor([k - 1 for k in ks], logits.device).unsqueeze(-1))
        probs = torch.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)  # ties with the k-th stay
    elif cut_k or cut_p:
        logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = cut_probs(logits, device_tensor(ks, logits.device) if cut_k else None,
                          device_tensor(top_ps, logits.device, torch.float32) if cut_p else None)
    else:
        probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs)
    if len(seeded) < len(generators):
        noise.exponential_()  # every row without a seed in one launch
    for j in seeded:
        noise[j].exponential_(generator=generators[j])
    if order is None:
        return torch.argmax(probs / noise, dim=-1)
    # Token t keeps the noise it would get unsorted, so a seeded row draws the same token whatever its batch
    # companions make the batch do (sort or not).
    picked = torch.argmax(probs / noise.gather(-1, order), dim=-1)
    return order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)

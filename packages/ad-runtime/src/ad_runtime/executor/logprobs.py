"""Logprobs of sampled tokens: the log-softmax of the model's raw logits, for the sampled token and the top k.

Raw means before logit_bias, penalties, temperature and top-k/top-p (vLLM's default "raw_logprobs"): the numbers
say what the model thinks, whatever the request did to pick a token. Computed on the device for the rows that ask
and read back with the sampled tokens, one step late under overlapped scheduling.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..sampling_params import SamplingParams
from .device_tensor import device_tensor


@dataclass
class TokenLogprobs:
    """Logprobs of one step's rows that asked for them (rows index the step's sampled tokens)."""

    rows: list[int]  # the batch rows that asked
    ks: list[int]  # top logprobs each of them wants
    sampled: torch.Tensor  # [len(rows)] float32: logprob of the sampled token
    top_ids: torch.Tensor  # [len(rows), max(ks)] int64, best first
    top_values: torch.Tensor  # [len(rows), max(ks)] float32

    def to_host(self) -> "TokenLogprobs":
        """Copies queued to (pinned) host memory; on a GPU they complete with the step's token copy."""
        if self.sampled.device.type == "cpu":
            return self
        nb = dict(device="cpu", non_blocking=True)
        return TokenLogprobs(self.rows, self.ks, self.sampled.to(**nb), self.top_ids.to(**nb),
                             self.top_values.to(**nb))

    def by_row(self, tokens: Sequence[int]) -> dict[int, dict[int, float]]:
        """Row -> {token id: logprob}: the sampled token first, then the top k best first (k or k + 1 entries)."""
        sampled = self.sampled.tolist()
        ids = self.top_ids.tolist()
        values = self.top_values.tolist()
        out = {}
        for j, (row, k) in enumerate(zip(self.rows, self.ks)):
            d = {tokens[row]: sampled[j]}
            for t, v in zip(ids[j][:k], values[j][:k]):
                d.setdefault(t, v)
            out[row] = d
        return out

    @staticmethod
    def concat(parts: Sequence["TokenLogprobs | None"], sizes: Sequence[int]) -> "TokenLogprobs | None":
        """One TokenLogprobs for batches sampled apart (`sizes`: rows of each), their rows shifted to the whole."""
        rows, ks, sampled, ids, values = [], [], [], [], []
        width = max((p.top_ids.shape[1] for p in parts if p is not None), default=0)
        offset = 0
        for p, size in zip(parts, sizes):
            if p is not None:
                rows += [r + offset for r in p.rows]
                ks += p.ks
                sampled.append(p.sampled)
                pad = width - p.top_ids.shape[1]  # narrower parts are padded; each row reads only its own k
                ids.append(torch.nn.functional.pad(p.top_ids, (0, pad)))
                values.append(torch.nn.functional.pad(p.top_values, (0, pad)))
            offset += size
        if not rows:
            return None
        return TokenLogprobs(rows, ks, torch.cat(sampled), torch.cat(ids), torch.cat(values))


def compute_logprobs(raw_logits: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
                     ) -> TokenLogprobs | None:
    """Logprobs for the rows whose params ask (`logprobs` not None); None when no row does."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    ks = [params[i].logprobs for i in rows]
    idx = device_tensor(rows, raw_logits.device)
    # Always fp32: logprobs of bf16 logits computed in bf16 would be off in the third digit.
    logp = torch.log_softmax(raw_logits.index_select(0, idx).float(), dim=-1)
    sampled = logp.gather(-1, tokens.index_select(0, idx).unsqueeze(-1)).squeeze(-1)
    top_values, top_ids = torch.topk(logp, max(ks), dim=-1)
    return TokenLogprobs(rows, ks, sampled, top_ids, top_values)

"""Overlapped scheduling's launched step: sampled tokens on the device, their copy to pinned host memory queued."""

from dataclasses import dataclass
from typing import Any

import torch

from .logprobs import TokenLogprobs
from .request import Request


class HostTokens:
    """Two pinned host buffers, used in turn: at most two launched steps are unread at a time."""

    def __init__(self, size: int, device: torch.device):
        pin = device.type == "cuda"
        self.bufs = [torch.empty(size, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.turn = 0

    def next(self, n: int) -> torch.Tensor:
        self.turn ^= 1
        return self.bufs[self.turn][:n]


@dataclass
class LaunchedStep:
    """A step whose sampled tokens are on the device: a copy to the host is queued right behind them."""

    reqs: list[Request]
    tokens: torch.Tensor  # int64 [len(reqs)] on the device: the next step's placeholders index it
    host: torch.Tensor
    ready: Any  # CUDA event recorded after the copies (None on a CPU, where the copies are synchronous)
    logprobs: TokenLogprobs | None = None  # host copies, for the rows that asked

    @staticmethod
    def start(reqs: list[Request], tokens: torch.Tensor, host_tokens: HostTokens,
              logprobs: TokenLogprobs | None = None) -> "LaunchedStep":
        host = host_tokens.next(len(reqs))
        if tokens.device.type == "cuda":
            # Queued now, before the next step's work: waiting for it later waits for this step only.
            host.copy_(tokens, non_blocking=True)
            logprobs = None if logprobs is None else logprobs.to_host()
            ready = torch.cuda.Event()
            ready.record()
        else:
            host.copy_(tokens)
            ready = None
        return LaunchedStep(reqs, tokens, host, ready, logprobs)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # the one sync of a step
        return self.host.tolist()

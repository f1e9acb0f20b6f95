"""Temperature / top-k / top-p sampling of small GPU batches replayed as captured CUDA graphs (few launches).

Outside a graph the sampler launches ~15 kernels and copies a step: 0.39-0.53 ms of host time at 1 and 8 rows of
SmolLM2-135M shapes on an H200. Here the same draw (sample_rows) is captured once per bucket of row counts, on first
use, and a step costs two copies (the logits, the rows' parameters) and one replay: 0.09-0.14 ms of host time
(benchmarks/README.md, fifteenth session). Those steps were the GPU's (0.72 ms against 0.60 greedy: the sort and
its passes), so they did not get shorter; the host keeps the time for the rest of the engine (HTTP, detokenizing).

Taken by batches of at most MAX_ROWS rows that all sample, with no seed, logprobs or logits processing (the
sampler's plain case), unless FlashInfer's sorting-free kernels can draw the batch (a top-p cut): they cost the GPU
less than a sort (8B shapes at batch 1, measured in different calls: +0.08 ms a step against +0.12). Every other
batch keeps the sampler's other paths. `AUTODEPLOY_GRAPH_SAMPLING=0` turns it off (A/B switch). The noise comes
from the default CUDA generator, whose state CUDA graphs advance per replay.
"""

import logging
import os

import torch

from .errors import first_line

logger = logging.getLogger(__name__)

# Above this many rows a step's own work outweighs the launches, and the graph's sort buffers (rows x vocab
# x ~28 bytes) would stay allocated. A batch takes the graph of the next of these row counts up (its extra rows
# draw from whatever logits they hold, and are dropped); all graphs share one memory pool.
BUCKETS = (1, 2, 4, 8, 16)
MAX_ROWS = BUCKETS[-1]


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                cut: bool = True) -> torch.Tensor:
    """One token per row of [R, V] logits, each row with its temperature (> 0), top_k (V for none) and top_p (1.0
    for none): the sampler's cuts (ties with the k-th value stay; a token is dropped when the mass strictly
    before it reaches top_p) and its exponential race, in sorted order. cut=False: no row has a top-k or top-p
    (they are not read). Tensors only: no host sync, capturable."""
    x = logits.float() / temperature.unsqueeze(-1)
    if not cut:  # temperature alone: the race over the whole vocabulary, no sort
        return torch.argmax(torch.softmax(x, dim=-1) / torch.empty_like(x).exponential_(), dim=-1)
    x, order = torch.sort(x, dim=-1, descending=True)
    probs = cut_probs(x, top_k, top_p)
    picked = torch.argmax(probs / torch.empty_like(probs).exponential_(), dim=-1)
    return order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)


def cut_probs(sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """softmax of [R, V] logits sorted in descending order, cut to each row's top_k ([R] int64; ties with the k-th
    value stay) and then its top_p ([R]; a token is dropped when the mass strictly before it reaches top_p, so at
    least one stays). None: that cut is not made. The sampler's rule, shared with its torch path."""
    x = sorted_logits
    if top_k is not None:
        x = x.masked_fill(x < x.gather(-1, (top_k - 1).clamp(0, x.shape[-1] - 1).unsqueeze(-1)), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p is not None:
        probs = probs.masked_fill(torch.cumsum(probs, dim=-1) - probs >= top_p.unsqueeze(-1), 0.0)
    return probs


class GraphSampling:
    """Captured sample_rows graphs, one per bucket of row counts (BUCKETS), on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda" and os.environ.get("AUTODEPLOY_GRAPH_SAMPLING", "1") != "0"
        # (bucket, vocab, dtype, any top-k/top-p cut) -> (graph, its logits, its parameters, its tokens)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._last_params: dict[tuple, tuple] = {}
        self._pool = None  # the graphs' shared memory pool (replays never overlap: one engine stream)
        self.num_replays = 0  # observability (tests check it)

    def applies(self, logits: torch.Tensor) -> bool:
        return self.enabled and logits.is_cuda and logits.dim() == 2 and logits.shape[0] <= MAX_ROWS

    def draw(self, logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]
             ) -> torch.Tensor | None:
        """Tokens [R] (int64, a view of the graph's output, valid until the next draw in the same bucket).
        `top_k`: V for none. None where a graph failed to capture or replay: said once, graphs are then off and
        the caller samples without them (as every later batch does)."""
        try:
            return self._draw(logits, temperature, top_k, top_p)
        except Exception as e:  # noqa: BLE001 - e.g. no memory left for a capture: the eager path samples correctly
            self.enabled = False
            logger.warning("sampling graphs are off after a failure (%s); small batches sample without them",
                           first_line(e))
            return None

    def _draw(self, logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float]
              ) -> torch.Tensor:
        rows, vocab = logits.shape
        bucket = next(b for b in BUCKETS if b >= rows)
        key = (bucket, vocab, logits.dtype, any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p))
        entry = self._graphs.get(key) or self._capture(key)
        graph, static_logits, static_params, tokens = entry
        static_logits[:rows].copy_(logits)
        pad = bucket - rows  # extra rows: temperature 1, top-k 1, no top-p (any valid row)
        params = (*temperature, *[1.0] * pad, *top_k, *[1] * pad, *top_p, *[1.0] * pad)
        if self._last_params.get(key) != params:  # a served batch keeps its parameters from step to step
            # from pinned memory: queued behind the running step, no wait (device_tensor.py)
            host = torch.tensor(params, dtype=torch.float32)
            static_params.copy_(host.pin_memory() if self.device.type == "cuda" else host, non_blocking=True)
            self._last_params[key] = params
        graph.replay()
        self.num_replays += 1
        return tokens[:rows]

    def _capture(self, key: tuple[int, int, torch.dtype, bool]):
        rows, vocab, dtype, cut = key
        static_logits = torch.zeros(rows, vocab, dtype=dtype, device=self.device)
        # [temperature | top_k | top_p] per row; top_k as float32 is exact below 2**24
        static_params = torch.ones(3 * rows, dtype=torch.float32, device=self.device)

        def run() -> torch.Tensor:
            t, k, p = static_params.view(3, rows)
            return sample_rows(static_logits, t, k.long(), p, cut)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()  # warm-up: the allocator and the sort's workspace
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            tokens = run()
        self._pool = graph.pool()
        self._graphs[key] = (graph, static_logits, static_params, tokens)
        self._last_params.pop(key, None)
        logger.info("captured the sampling graph for up to %d rows", rows)
        return self._graphs[key]

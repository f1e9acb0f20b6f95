"""CUDA graphs for decode: one graph per captured batch size, replayed on the cm's own input buffers."""

import logging
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from ..executor.sampler import greedy_tokens
from ..kv_cache.interface import CachedSequenceInterface

logger = logging.getLogger(__name__)


class CudaGraphModel(nn.Module):
    """Runs decode-only steps by replaying the graph of the next captured batch size; others eagerly.

    No input copies: SequenceInfo keeps every input at a fixed address and, once `batch_sizes` are
    set on it, writes the padding rows of decode-only batches in the same host-to-device copy as the
    real ones. A replayed step returns a view of the graph's static output, valid until the next step.

    Each graph also holds the greedy pick of its logits (argmax per row, as the sampler computes it): after a
    replay `last_greedy` is that pick for the step's rows, so a greedy batch is sampled without a launch of its
    own (two Triton launches, ~20 us of host time each, on a decode step that small models finish in ~0.6 ms).
    Its buffer is rewritten by the next replay; the engine reads it (next step's placeholders, the copy to the
    host) in stream order before that. `AUTODEPLOY_GRAPH_GREEDY=0` captures without it (an A/B switch).
    """

    def __init__(self, model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int]):
        super().__init__()
        self.model = model
        self.cm = cm
        limit = min(cm.info.max_batch_size, cm.info.max_num_tokens)
        self.batch_sizes = sorted({b for b in batch_sizes if 0 < b <= limit})
        dropped = sorted(set(batch_sizes) - set(self.batch_sizes))
        if dropped:
            logger.warning("cuda graph batch sizes %s exceed max_batch_size/max_num_tokens and are skipped", dropped)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}  # rows -> the argmax of that graph's logits, [rows] int64
        self.last_greedy: torch.Tensor | None = None  # the last step's greedy pick when it was a replay
        self._input_ptr = 0
        self.num_replays = 0  # steps served by a graph (observability; tests check it)
        self.capture()

    @torch.inference_mode()  # as GraphRunner calls the model: under no_grad, the compiled model's guards on its
    def capture(self) -> None:  # inputs' dispatch keys failed at the first request, which then compiled it again
        info, pool = self.cm.info, None
        with_greedy = os.environ.get("AUTODEPLOY_GRAPH_GREEDY", "1") != "0"
        t0 = time.perf_counter()
        info.cuda_graph_batch_sizes = []  # no padding while we set up the dummy batches ourselves
        # Largest first: smaller graphs then fit into the memory pool the largest one reserved.
        for bs in tqdm(sorted(self.batch_sizes, reverse=True), desc="capturing CUDA graphs", disable=None):
            # Dummy decodes of one token each (on the scratch page and the state caches' scratch row).
            info.nest_sequences(*info.dummy_columns([1] * bs))
            args = self.cm.padded_decode_args(bs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                # Warm-up: Inductor's and Triton's compiles, cuBLAS workspaces, the allocator. Twice for the first
                # (largest) size; once is enough for the rest, whose only new work is a shape's first launches.
                for _ in range(1 if self.graphs else 2):
                    self._step(args, bs, with_greedy)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls (FlashInfer's sampling loader) may not void the capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[bs], greedy = self._step(args, bs, with_greedy)
            if greedy is not None:
                self.greedy[bs] = greedy
            pool = graph.pool()
            self.graphs[bs] = graph
        self._input_ptr = self.cm.padded_decode_args(1)["input_ids"].data_ptr() if self.batch_sizes else 0
        info.cuda_graph_batch_sizes = list(self.batch_sizes)
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self.batch_sizes,
                    time.perf_counter() - t0)

    def _step(self, args: dict[str, torch.Tensor], rows: int, with_greedy: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captured work: the model, and the greedy pick of its [1, rows, V] logits."""
        out = self.model(**args)
        if with_greedy and isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[:2] == (1, rows):
            return out, greedy_tokens(out[0])
        return out, None

    def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
        info = self.cm.info
        rows, b = info.num_padded_rows, info.num_sequences
        # Replay only when called with this cm's current step (the graphs read its buffers, not kwargs).
        if (
            info.is_decode_only
            and rows in self.graphs
            and kwargs["input_ids"].data_ptr() == self._input_ptr
            and kwargs["input_ids"].shape[1] == b
        ):
            self.graphs[rows].replay()
            self.num_replays += 1
            greedy = self.greedy.get(rows)
            self.last_greedy = None if greedy is None else greedy[:b]
            return self.outputs[rows][:, :b]
        self.last_greedy = None
        return self.model(**kwargs)

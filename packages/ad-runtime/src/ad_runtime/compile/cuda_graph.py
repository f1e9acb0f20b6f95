"""CUDA graphs for decode: one graph per captured batch size, replayed on the cm's own input buffers."""

import logging

import torch
import torch.nn as nn
from tqdm import tqdm

from ..kv_cache.interface import CachedSequenceInterface

logger = logging.getLogger(__name__)


class CudaGraphModel(nn.Module):
    """Runs decode-only steps by replaying the graph of the next captured batch size; others eagerly.

    No input copies: SequenceInfo keeps every input at a fixed address and, once `batch_sizes` are
    set on it, writes the padding rows of decode-only batches in the same host-to-device copy as the
    real ones. A replayed step returns a view of the graph's static output, valid until the next step.
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
        self._input_ptr = 0
        self.num_replays = 0  # steps served by a graph (observability; tests check it)
        self.capture()

    @torch.inference_mode()  # as GraphRunner calls the model: under no_grad, the compiled model's guards on its
    def capture(self) -> None:  # inputs' dispatch keys failed at the first request, which then compiled it again
        info, pool = self.cm.info, None
        info.cuda_graph_batch_sizes = []  # no padding while we set up the dummy batches ourselves
        # Largest first: smaller graphs then fit into the memory pool the largest one reserved.
        for bs in tqdm(sorted(self.batch_sizes, reverse=True), desc="capturing CUDA graphs", disable=None):
            # Dummy decodes of one token each, on the scratch page: valid inputs that touch no real cache data.
            info.nest_sequences([[0]] * bs, [0] * bs, [[info.scratch_page]] * bs)
            args = self.cm.padded_decode_args(bs)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: torch.compile, cuBLAS workspaces, allocator
                    self.model(**args)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(**args)
            pool = graph.pool()
            self.graphs[bs] = graph
        self._input_ptr = self.cm.padded_decode_args(1)["input_ids"].data_ptr() if self.batch_sizes else 0
        info.cuda_graph_batch_sizes = list(self.batch_sizes)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

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
            return self.outputs[rows][:, :b]
        return self.model(**kwargs)

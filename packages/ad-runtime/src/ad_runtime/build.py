"""Compose an engine from LlmArgs: factory -> cache interface -> transform pipeline -> scheduler."""

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from .executor.core import EngineCore
from .executor.engine import Engine, StepSequence
from .executor.request import Request
from .executor.request_loop import ABORT_MESSAGE  # re-exported: the server and the ranks abort with it
from .executor.scheduler import Scheduler
from .kv_cache.interface import CachedSequenceInterface, ScheduledSequence
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def resolve_device(device: str, rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device(f"cuda:{rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for, but no CUDA GPU is visible")
        if dev.index is None:
            dev = torch.device(f"cuda:{rank}")
    return dev


class GraphRunner:
    """Feeds one flattened batch to the compiled graph and returns each sequence's last-token logits."""

    def __init__(self, module: nn.Module, cm: CachedSequenceInterface):
        self.module = module
        self.cm = cm
        self.device = cm.device

    @torch.inference_mode()
    def forward(self, batch: Sequence[StepSequence], num_prefill: int, future: torch.Tensor | None = None
                ) -> torch.Tensor:
        self.cm.update([ScheduledSequence(s.token_ids, s.input_pos, s.pages, s.slot) for s in batch])
        if future is not None:
            self.cm.info.resolve_future_tokens(future)  # placeholders -> the previous step's sampled ids
        logits = self.module(**self.cm.named_args)
        if logits.shape[1] == len(batch):
            # One row per sequence: the graph gathered the last tokens (gather_logits_before_lm_head),
            # or every sequence fed one token; T == B means last_token_idx is 0..B-1 either way.
            return logits[0]
        return logits[0].index_select(0, self.cm.info.last_token_idx)


def eos_token_ids(factory: Any, tokenizer: Any | None) -> list[int]:
    """End tokens from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for src in (getattr(factory, "generation_config", None), getattr(factory, "config", None), tokenizer):
        val = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    return sorted(ids)


def _stage_progress(total: int, rank: int) -> Any:
    """A progress bar over the pipeline's transforms (rank 0, on a terminal only); called before each one."""
    import sys

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="Compiling", unit="transform", file=sys.stderr, leave=False,
               disable=None if rank == 0 else True)

    def step(name: str, cfg: Any) -> None:
        bar.set_postfix_str(f"{cfg.stage}: {name}", refresh=False)
        bar.update(1)
        if bar.n >= total:
            bar.close()

    return step


def build_graph(args: Any, rank: int = 0, world_size: int = 1) -> tuple[nn.Module, CachedSequenceInterface, Any]:
    """Run the whole transform pipeline; returns (compiled module, cache interface, factory)."""
    import ad_runtime  # noqa: F401 - registers runtime transforms and backends
    from ad_compiler.export.pipeline import factory_from_args
    from ad_compiler.transform import InferenceOptimizer, SharedConfig

    from .device_checks import check_backends_for_device

    device = resolve_device(args.device, rank)
    check_backends_for_device(args, device)
    torch.manual_seed(args.seed)
    factory = factory_from_args(args, device=str(device))
    max_num_tokens = args.max_num_tokens or args.max_batch_size * args.max_seq_len
    num_pages = None
    kv = getattr(args, "kv_cache_config", None)
    if kv is not None and kv.max_tokens:
        num_pages = -(-kv.max_tokens // args.attn_page_size)
    cm = CachedSequenceInterface(
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        page_size=args.attn_page_size,
        max_num_tokens=max_num_tokens,
        num_pages=num_pages,
        device=device,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    cm.max_num_pages = num_pages  # resize_kv_cache never grows the cache past kv_cache_config.max_tokens
    shared = SharedConfig(
        local_rank=rank, world_size=world_size, device=str(device),
        extras={"max_seq_len": args.max_seq_len, "max_batch_size": args.max_batch_size},
    )
    optimizer = InferenceOptimizer(factory, args.transforms)
    module = optimizer(cm=cm, shared_config=shared, progress=_stage_progress(len(optimizer.config), rank))
    failed = [n for n, h in optimizer.history.items() if h.error]
    if failed:
        logger.warning("transforms skipped after errors: %s", failed)
    return module, cm, factory


def build_engine(args: Any, rank: int = 0, world_size: int = 1, runner_wrapper: Any = None) -> tuple[Engine, Any, Any]:
    """(engine, tokenizer, factory) for one rank."""
    module, cm, factory = build_graph(args, rank, world_size)
    runner = GraphRunner(module, cm)
    if runner_wrapper is not None:
        runner = runner_wrapper(runner)
    tokenizer = factory.init_tokenizer() if rank == 0 else None
    scheduler = Scheduler(
        cm.pool, args.max_batch_size, cm.info.max_num_tokens, args.enable_chunked_prefill, cm.num_pages,
        enable_prefix_caching=args.enable_prefix_caching, has_state=bool(cm.state_specs),
    )
    overlap = args.overlap_scheduler
    if overlap is None:  # auto: where it helps, a single process on a GPU (CPU ops run synchronously anyway)
        overlap = world_size == 1 and runner.device.type == "cuda"
    engine = Engine(
        runner, scheduler, tokenizer, args.max_seq_len, eos_token_ids(factory, tokenizer),
        max_input_len=args.max_input_len, vocab_size=factory.vocab_size, overlap=overlap and world_size == 1,
    )
    return engine, tokenizer, factory


class LocalBackend:
    """One process, one device; safe to call from many threads (they share the engine's batches)."""

    def __init__(self, args: Any):
        self.engine, self.tokenizer, self.factory = build_engine(args)
        self.core = EngineCore(self.engine)
        self.vocab_size = int(self.factory.vocab_size)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None]) -> list[Request]:
        reqs = [self.core.submit(p, sp, t) for p, sp, t in zip(prompts, params, texts)]
        try:
            self.core.run(reqs)
        finally:
            for req in reqs:  # the caller gave up (KeyboardInterrupt): free what it leaves behind
                if not req.is_finished:
                    self.core.abort(req, ABORT_MESSAGE)
        return reqs

    def stream(self, prompt: list[int], params: SamplingParams, text: str | None) -> Iterator[Request]:
        req = self.core.submit(prompt, params, text)

        def refresh_text(r: Request) -> None:
            if not r.is_finished:
                r.text = self.core.stream_text(r)

        try:
            yield from self.core.stream(req, refresh_text)
        finally:
            # A caller that stops listening early frees the request's slot, as with DistributedBackend.
            if not req.is_finished:
                self.core.abort(req, ABORT_MESSAGE)

    def shutdown(self) -> None:
        self.engine = self.core = None  # type: ignore[assignment]


def build_engine_backend(args: Any) -> Any:
    if args.world_size > 1:
        from .distributed_backend import DistributedBackend

        return DistributedBackend(args)
    return LocalBackend(args)

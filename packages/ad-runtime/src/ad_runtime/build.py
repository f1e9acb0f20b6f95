"""Compose an engine from LlmArgs: factory -> cache interface -> transform pipeline -> scheduler."""

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from ad_compiler.export.graph_pickle import loads_graph
from ad_config.transform_config import Stage

from .compile.backends import compile_backend_of
from .compile.cuda_graph import CudaGraphModel
from .executor.core import EngineCore
from .executor.engine import Engine
from .executor.request import Request
from .executor.request_loop import ABORT_MESSAGE  # re-exported: the server and the ranks abort with it
from .executor.scheduler import Scheduler
from .kv_cache.interface import CachedSequenceInterface, StepSequence
from .memory_plan import MemoryPlan, check_fits, plan_memory
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from ad_compiler.models.factory import ModelFactory
    from ad_config import LlmArgs

    from .distributed_backend import DistributedBackend

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
        # The decode graphs' greedy pick of the last step's logits (CudaGraphModel.last_greedy), or None.
        self._graphs = module if isinstance(module, CudaGraphModel) else None
        self.last_greedy: torch.Tensor | None = None

    @torch.inference_mode()
    def forward(self, batch: Sequence[StepSequence], num_prefill: int, future: torch.Tensor | None = None
                ) -> torch.Tensor:
        self.cm.update_columns([s.token_ids for s in batch], [s.input_pos for s in batch], [s.pages for s in batch],
                               [s.slot for s in batch])
        if future is not None:
            self.cm.info.resolve_future_tokens(future)  # placeholders -> the previous step's sampled ids
        logits = self.module(**self.cm.named_args)
        if logits.shape[1] == len(batch):
            # One row per sequence: the graph gathered the last tokens (gather_logits_before_lm_head),
            # or every sequence fed one token; T == B means last_token_idx is 0..B-1 either way.
            self.last_greedy = None if self._graphs is None else self._graphs.last_greedy
            return logits[0]
        self.last_greedy = None
        return logits[0].index_select(0, self.cm.info.last_token_idx)


def eos_token_ids(factory: "ModelFactory", tokenizer: Any | None) -> list[int]:
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


# The build cache holds the graph after this stage: export and the graph rewrites are done (they depend only on the
# configuration, the model's structure and the rank); weights are not loaded yet, so entries hold no weights and a
# warm build loads them from the checkpoint as a cold one does (through the sharding load hooks).
CACHE_CUT = Stage.SHARDING
# Checks that a warm build does not repeat: an entry is written only after they passed in the build that made it,
# and every input they depend on (configuration, checkpoint, code) is part of the entry's key.
PASSED_WHEN_STORED = ("verify_cached_decode",)


def _passed(info: Any) -> bool:
    """The transform ran and did its work (a check that was disabled, skipped or failed did not pass)."""
    return info is not None and not info.skipped and info.error is None and info.num_matches > 0


@dataclass
class BuildReport:
    """How one rank's graph was built: seconds, and what the build cache did (hit, miss, off)."""

    seconds: float
    cache: str
    entry: Path | None = None
    memory: MemoryPlan | None = None  # weights and KV cache of this rank, as planned before loading
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, of what ran in this process
    transforms: dict[str, float] = field(default_factory=dict)  # seconds per transform, of what ran here

    def summary(self) -> str:
        where = f" ({self.entry})" if self.entry is not None and self.cache != "off" else ""
        return f"build: {self.seconds:.1f} s, build cache {self.cache}{where}"

    def timings(self, top: int = 5) -> str:
        """One line: seconds per stage, then the slowest transforms (what to look at to make a build faster)."""
        other = self.seconds - sum(self.stages.values())  # factory, cache key, memory plan: outside any transform
        stages = ", ".join(f"{k} {v:.1f}" for k, v in {**self.stages, "outside transforms": other}.items())
        slow = sorted(self.transforms.items(), key=lambda kv: -kv[1])[:top]
        return f"stages (s): {stages} | slowest: " + ", ".join(f"{k} {v:.1f}" for k, v in slow)


def _timings(history: dict[str, Any], ran: set[str], loaded_s: float | None) -> tuple[dict, dict]:
    """(seconds per stage, seconds per transform) of the transforms in `ran`; a cache load counts as its own stage."""
    stages: dict[str, float] = {"build cache load": loaded_s} if loaded_s is not None else {}
    transforms = {}
    for name, info in history.items():
        if name in ran:
            stages[info.stage] = stages.get(info.stage, 0.0) + info.seconds
            transforms[name] = info.seconds
    return stages, transforms


def _cache_interface(args: "LlmArgs", device: torch.device) -> CachedSequenceInterface:
    """The cache interface the pipeline builds against, sized by the args (kv_cache_config.max_tokens caps it)."""
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
    return cm


def _resume_from_entry(optimizer: Any, cached: Any, rank: int) -> tuple[nn.Module, Any, dict[str, str], set[str]]:
    """A build cache hit: the entry's graph and history stand in for the transforms up to the cache cut.
    Returns (graph, progress bar, transforms to skip with why, transforms this process runs)."""
    made_it = {n for n, _ in optimizer.selected(0, CACHE_CUT.order)}
    optimizer.history.update({n: info for n, info in cached.history.items() if n in made_it})
    progress = _stage_progress(len(optimizer.selected(CACHE_CUT.order + 1)), rank)
    skip = {name: "passed in the build that wrote the build cache entry" for name in PASSED_WHEN_STORED
            if _passed(cached.history.get(name))}
    return cached.graph, progress, skip, {n for n, _ in optimizer.selected(CACHE_CUT.order + 1)}


def _run_to_cache_cut(optimizer: Any, cm: CachedSequenceInterface, shared: Any, entry: Any, rank: int
                      ) -> tuple[nn.Module, Any, bytes | None, set[str]]:
    """A miss (or no cache): run the transforms up to the cache cut. Returns (graph, progress bar, the entry's
    snapshot of it or None, transforms this process runs)."""
    progress = _stage_progress(len(optimizer.config), rank)
    module = optimizer(cm=cm, shared_config=shared, until=CACHE_CUT, progress=progress)
    snapshot = entry.snapshot(module) if entry is not None else None  # before weight loading changes it
    if snapshot is not None:
        # Go on from the graph as the entry holds it, as every later build will: torch.compile's on-disk
        # caches (AOTAutograd's) key on the graph it traces, and the graph unpickled from the entry differs from
        # the one built in memory, so a second process missed them (an 8B build on an H200: 58 s, the third
        # process 27 s).
        module = loads_graph(snapshot)
    return module, progress, snapshot, {n for n, _ in optimizer.selected(0)}


def build_graph(
    args: "LlmArgs", rank: int = 0, world_size: int = 1
) -> tuple[nn.Module, CachedSequenceInterface, "ModelFactory", BuildReport]:
    """Run the transform pipeline (from the build cache's entry when there is one);
    returns (compiled module, cache interface, factory, report)."""
    import ad_runtime  # noqa: F401 - registers runtime transforms and backends
    from ad_compiler.export.pipeline import factory_from_args
    from ad_compiler.transform import InferenceOptimizer, SharedConfig

    from .build_cache import BuildCacheEntry
    from .device_checks import check_backends_for_device

    start = time.perf_counter()
    device = resolve_device(args.device, rank)
    check_backends_for_device(args, device)
    torch.manual_seed(args.seed)
    factory = factory_from_args(args, device=str(device))
    cm = _cache_interface(args, device)
    shared = SharedConfig(
        local_rank=rank, world_size=world_size, device=str(device),
        extras={"max_seq_len": args.max_seq_len, "max_batch_size": args.max_batch_size,
                "compile_backend": compile_backend_of(args, device)},
    )
    optimizer = InferenceOptimizer(factory, args.transforms)
    entry = BuildCacheEntry.for_build(args, factory, device, rank, world_size) if args.build_cache else None
    loaded_at = time.perf_counter()
    cached = entry.load() if entry is not None else None
    loaded_s = time.perf_counter() - loaded_at if cached is not None else None
    if cached is not None:
        module, progress, skip, ran = _resume_from_entry(optimizer, cached, rank)
        status, snapshot = "hit", None
    else:
        module, progress, snapshot, ran = _run_to_cache_cut(optimizer, cm, shared, entry, rank)
        status, skip = ("off" if entry is None else "miss"), None
    # Sharded, still on meta: what this rank will hold is known now, before any weight is read.
    plan = plan_memory(module, cm, args, _tied_weights(factory))
    if plan is not None:
        logger.info("memory plan (rank %d): %s", rank, plan.summary())
        check_fits(plan, rank, device)
    module = optimizer(cm=cm, mod=module, shared_config=shared, after=CACHE_CUT, skip=skip, progress=progress)
    if snapshot is not None and not entry.store(snapshot, optimizer.history):
        status = "miss (not stored)"
    failed = [n for n, h in optimizer.history.items() if h.error]
    if failed:
        logger.warning("transforms skipped after errors: %s", failed)
    report = BuildReport(time.perf_counter() - start, status, entry.path if entry is not None else None, plan,
                         *_timings(optimizer.history, ran, loaded_s))
    logger.info("rank %d: %s", rank, report.summary())
    logger.info("rank %d: %s", rank, report.timings())
    return module, cm, factory, report


def _tied_weights(factory: "ModelFactory") -> dict[str, str]:
    """Target -> source names of the factory's tied weights (none for factories that do not say)."""
    tied = getattr(factory, "tied_weights", None)
    return tied() if callable(tied) else {}


def build_engine(
    args: "LlmArgs", rank: int = 0, world_size: int = 1, runner_wrapper: Any = None
) -> tuple[Engine, Any, "ModelFactory", BuildReport]:
    """(engine, tokenizer, factory, build report) for one rank."""
    module, cm, factory, report = build_graph(args, rank, world_size)
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
    return engine, tokenizer, factory, report


class LocalBackend:
    """One process, one device; safe to call from many threads (they share the engine's batches)."""

    def __init__(self, args: "LlmArgs"):
        self.engine, self.tokenizer, self.factory, report = build_engine(args)
        self.build_reports = [report]
        self.core = EngineCore(self.engine)
        self.vocab_size = int(self.factory.vocab_size)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None]
                 ) -> list[Request]:
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


def build_engine_backend(args: "LlmArgs") -> "LocalBackend | DistributedBackend":
    if args.world_size > 1 or args.engine_process:
        from .distributed_backend import DistributedBackend

        return DistributedBackend(args)
    return LocalBackend(args)

"""The memory plan: weight and KV-cache bytes of one rank, read off the sharded meta graph before any weight loads."""

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.utils.graph_utils import get_attr_tensor, nodes_calling
from torch.fx import GraphModule

if TYPE_CHECKING:
    from ad_config import LlmArgs

    from .kv_cache.interface import CachedSequenceInterface

logger = logging.getLogger(__name__)

GIB = 1024**3
MIB = 1024**2


@dataclass
class MemoryPlan:
    """Bytes one rank will hold: its weights (sharded) and the paged KV cache of the attention layers."""

    weight_bytes: int
    kv_bytes_per_token: int  # all attention layers, K and V, in the cache dtype
    kv_pages: int  # usable pages: as configured, or on a GPU what resize_kv_cache will give them
    page_size: int
    min_kv_tokens: int  # one sequence of max_seq_len: below that nothing can be served
    available_bytes: int | None  # free memory of the device now (None: unknown)
    activation_bytes: int = 0  # intermediates alive at once in a step of max_num_tokens (eager graph: an upper bound)
    max_num_tokens: int = 0

    @property
    def kv_bytes(self) -> int:
        """What the cache allocates: the usable pages and the scratch page that padded rows write to."""
        return self.kv_bytes_per_token * (self.kv_pages + 1) * self.page_size

    def summary(self) -> str:
        free = f", {self.available_bytes / GIB:.2f} GiB free" if self.available_bytes is not None else ""
        return (f"weights {self.weight_bytes / MIB:.1f} MiB, activations {self.activation_bytes / MIB:.1f} MiB at "
                f"{self.max_num_tokens} tokens, KV cache {self.kv_bytes / MIB:.1f} MiB ({self.kv_pages} pages of "
                f"{self.page_size} tokens, {self.kv_bytes_per_token} B per token){free}")


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied ones once), at their final dtype and shard shape."""
    first: dict[object, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        first.setdefault(_identity(t), t)
    return sum(t.numel() * t.element_size() for t in first.values())


def _identity(t: torch.Tensor) -> object:
    """What two tied tensors share: their storage once loaded (tied parameters may be two objects over one
    storage), the object itself on meta and for opaque tensors (oneDNN's packed weights have no storage)."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return id(t)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def kv_bytes_per_token(gm: GraphModule, cm: "CachedSequenceInterface", backend: str) -> int:
    """K and V bytes per cached token over all attention layers, as the attention backend will lay them out."""
    from .attention.registry import AttentionRegistry, resolve_attention_backend

    desc = AttentionRegistry.get(resolve_attention_backend(backend, cm.device, cm.kv_cache_dtype))
    total = 0
    for node in nodes_calling(gm, desc.source_op()):
        for spec in desc.cache_specs(node).values():
            total += spec.n_kv_heads * spec.head_dim * cm.cache_dtype(spec).itemsize
    return total


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def activation_peak_bytes(gm: GraphModule, tokens: int, logit_rows: int) -> int:
    """Most bytes of intermediate tensors alive at once in one forward of `tokens` tokens, from the fake values the
    graph was exported with: a tensor whose leading dims are the example's (batch, sequence) or their product
    grows with the token count, the graph's outputs (the logits) count `logit_rows` rows, other tensors keep their
    size; views share their base's bytes and keep it alive. Eager order without fusion: an upper bound of what a
    compiled graph holds."""
    ids = next((n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"), None)
    if not isinstance(ids, torch.Tensor) or ids.dim() < 1:
        raise ValueError("the graph's first input has no example value")
    lead = tuple(ids.shape[:2])  # (batch, sequence) of the example (input_ids)
    t0 = math.prod(lead)
    outputs = {a for a in gm.graph.output_node().all_input_nodes}
    size: dict[int, int] = {}  # storage -> bytes at `tokens`
    last_use: dict[int, int] = {}  # storage -> index of the last node that reads any view of it
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    born: dict[int, list[int]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        for t in _tensors(node.meta.get("val")):
            key = t.untyped_storage()._cdata
            rows = logit_rows if node in outputs else tokens
            scale = rows / t0 if tuple(t.shape[:2]) == lead or (t.dim() and t.shape[0] == t0) else 1.0
            nbytes = int(t.numel() * t.element_size() * scale)
            if key not in size:
                born.setdefault(order[node], []).append(key)
            size[key] = max(size.get(key, 0), nbytes)
            end = max([order[u] for u in node.users] + [order[node]])
            last_use[key] = max(last_use.get(key, 0), len(order) if node in outputs else end)
    live, peak = 0, 0
    dies: dict[int, list[int]] = {}
    for key, end in last_use.items():
        dies.setdefault(end, []).append(key)
    for i in range(len(order)):
        live += sum(size[k] for k in born.get(i, []))
        peak = max(peak, live)
        live -= sum(size[k] for k in dies.get(i, []))
    return peak


def device_free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        # Linux's own estimate of what can be allocated without swapping (free plus reclaimable page cache).
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def plan_memory(
    gm: nn.Module, cm: "CachedSequenceInterface", args: "LlmArgs", tied: dict[str, str] | None = None
) -> MemoryPlan | None:
    """The plan for the graph at the cache cut (sharded, weights still on meta); `tied`: the factory's tied weights
    (target -> source), which the loader gives one storage.

    None, with a warning saying why, where the graph does not tell (not a GraphModule, attention without shapes).
    Attention KV pages only: per-sequence state caches (Mamba, linear attention) are small and not counted.
    """
    try:
        if not isinstance(gm, GraphModule):
            raise TypeError(f"the pipeline gave a {type(gm).__name__}, not a GraphModule")
        cfg = args.transforms.get("insert_cached_attention")
        per_token = kv_bytes_per_token(gm, cm, cfg.backend) if cfg is not None and cfg.enabled else 0
    except Exception as e:  # noqa: BLE001 - the plan informs; a graph it cannot read still builds
        text = str(e).strip()
        logger.warning("no memory plan: %s: %s", type(e).__name__, text.splitlines()[0] if text else "")
        return None
    try:
        activations = activation_peak_bytes(gm, cm.info.max_num_tokens, cm.info.max_batch_size)
    except Exception as e:  # noqa: BLE001 - weights and KV still plan; the line says what is not counted
        logger.warning("memory plan without activations: %s: %s", type(e).__name__, str(e).strip()[:200])
        activations = 0
    weights = weight_bytes(gm) - _tied_bytes(gm, cm, args, tied or {}) + _dense_copy_bytes(gm, cm, args)
    available = device_free_bytes(cm.device)
    return MemoryPlan(
        weight_bytes=weights,
        kv_bytes_per_token=per_token,
        kv_pages=_kv_pages(cm, args, per_token, available, weights, activations),
        page_size=cm.page_size,
        min_kv_tokens=args.max_seq_len,
        available_bytes=available,
        activation_bytes=activations,
        max_num_tokens=cm.info.max_num_tokens,
    )


def _kv_pages(cm: "CachedSequenceInterface", args: "LlmArgs", per_token: int, available: int | None,
              weights: int, activations: int) -> int:
    """The usable pages the build will allocate: on a GPU what resize_kv_cache will make of the memory left after
    the weights and the activations (its free_mem_ratio of it, capped by max_tokens); on a CPU the configured pages,
    or what initialize_cache fits in half the memory the weights leave (first_kv_pages)."""
    resize = args.transforms.get("resize_kv_cache")
    if not per_token or available is None:
        return cm.num_pages
    if cm.device.type == "cpu":
        return first_kv_pages(cm.num_pages, per_token * cm.page_size, (available - weights) // host_ranks())
    if cm.device.type != "cuda" or resize is None or not resize.enabled:
        return cm.num_pages
    return max(0, pages_that_fit(available - weights - activations - cm.state_bytes(), resize.free_mem_ratio,
                                 per_token * cm.page_size, getattr(cm, "max_num_pages", None)))


# Share of the free memory the first KV allocation may take: on a GPU the forward that resize_kv_cache runs to
# measure activations needs the rest (and resize_kv_cache then sizes the cache); on a CPU it is the cache's size.
FIRST_ALLOCATION_SHARE = 0.5


def first_kv_pages(configured: int, bytes_per_page: int, free_bytes: int) -> int:
    """initialize_cache's rule: the configured pages (max_batch_size sequences of max_seq_len) where they fit in
    FIRST_ALLOCATION_SHARE of `free_bytes` with the scratch page, else as many as fit (0 or more)."""
    fit = int(FIRST_ALLOCATION_SHARE * free_bytes) // bytes_per_page - 1
    return min(configured, max(fit, 0))


def host_ranks() -> int:
    """Ranks that share this host's memory: all of them (the launcher starts every CPU rank on one host)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def pages_that_fit(spare_bytes: int, free_mem_ratio: float, bytes_per_page: int, max_num_pages: int | None) -> int:
    """Usable KV pages in free_mem_ratio of spare_bytes (less the scratch page allocated on top of them), capped by
    kv_cache_config.max_tokens' pages: resize_kv_cache's rule, which the plan predicts with."""
    pages = int(free_mem_ratio * spare_bytes) // bytes_per_page - 1
    return min(pages, max_num_pages) if max_num_pages is not None else pages


def _dense_copy_bytes(gm: GraphModule, cm: "CachedSequenceInterface", args: "LlmArgs") -> int:
    """Bytes of the packed copies prepack_cpu_linear makes beside weights it keeps dense (one_row_dense)."""
    from .transform.library import prepack_cpu_linear

    if not (prepack_cpu_linear.will_run(args, cm.device) and prepack_cpu_linear.keeps_dense(args)):
        return 0
    tensors = (get_attr_tensor(gm, t) for t in prepack_cpu_linear.packed_targets(gm))
    return sum(t.numel() * t.element_size() for t in tensors)


def _tied_bytes(gm: GraphModule, cm: "CachedSequenceInterface", args: "LlmArgs", tied: dict[str, str]) -> int:
    """Bytes the loader shares between tied weights (lm_head.weight takes model.embed_tokens.weight's tensor): two
    tensors on meta, one storage once loaded. Not shared when prepack_cpu_linear replaces one side by its packed
    copy (without one_row_dense) or when sharding gave the two different shapes."""
    from .transform.library import prepack_cpu_linear

    # With one_row_dense the packed copy is counted by _dense_copy_bytes and the dense head still shares.
    replaced = prepack_cpu_linear.will_run(args, cm.device) and not prepack_cpu_linear.keeps_dense(args)
    packed = prepack_cpu_linear.packed_targets(gm) if replaced else set()
    total = 0
    for target, source in tied.items():
        try:
            a, b = get_attr_tensor(gm, target), get_attr_tensor(gm, source)
        except (AttributeError, KeyError):
            continue
        if a is not b and a.shape == b.shape and a.dtype == b.dtype and not {target, source} & packed:
            total += a.numel() * a.element_size()
    return total


def check_fits(plan: MemoryPlan, rank: int, device: torch.device) -> None:
    """Refuse, in one line and before any weight is read, a rank whose weights and one sequence's KV cache exceed
    the device's free memory."""
    if plan.available_bytes is None:
        return
    need = plan.weight_bytes + plan.activation_bytes + plan.kv_bytes_per_token * plan.min_kv_tokens
    if need <= plan.available_bytes:
        return
    short = need - plan.available_bytes
    raise CompileError(
        f"rank {rank} needs {need / GIB:.2f} GiB on {device} ({plan.weight_bytes / GIB:.2f} GiB of weights + "
        f"{plan.activation_bytes / GIB:.2f} GiB of activations at {plan.max_num_tokens} tokens + "
        f"{plan.kv_bytes_per_token * plan.min_kv_tokens / GIB:.2f} GiB of KV cache for one {plan.min_kv_tokens}-token "
        f"sequence) but {plan.available_bytes / GIB:.2f} GiB are free, {short / GIB:.2f} GiB short: raise world_size, "
        "lower max_num_tokens or max_seq_len, use a smaller dtype or kv_cache_dtype"
    )

"""Piecewise CUDA graphs for prefill and mixed steps: the graph is split at its cache ops, every piece between them
is captured once per token bucket, and the cache ops (attention, state updates, the logits gather) run eagerly
between the replays, on the step's real token count.

A prefill step outside CUDA graphs is host-bound: a lone 128-token prompt of an 8B model took ~30 ms of op
dispatch for ~5 ms of GPU work (H200, benchmarks/README.md). Replaying the pieces leaves one eager call per
layer. A step of T tokens runs in the smallest bucket >= T: token inputs are copied into padded buffers, the
padding rows compute garbage that no real token reads (pieces hold per-token ops only; everything that mixes
tokens or sequences reads step metadata, so it is eager), and eager code sees the first T rows of each output.
"""

import bisect
import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from ad_compiler.utils.graph_utils import get_attr_tensor
from torch.fx import GraphModule, Node

from ..kv_cache.interface import CachedSequenceInterface
from .direct_calls import call_custom_ops_directly
from .piecewise_split import PROBE_TOKENS, flat_values, probe_shapes, split_at_eager_nodes

logger = logging.getLogger(__name__)

Capturer = Callable[[Callable[[], Any]], tuple[Callable[[], None], Any]]


def default_piecewise_num_tokens(cm: CachedSequenceInterface, upper: int = 1024) -> list[int]:
    """Powers of two from 16 up to `upper` (past it a step is GPU-bound on an 8B model), max_num_tokens and
    max_seq_len."""
    limit = min(upper, cm.info.max_num_tokens, cm.info.max_seq_len)
    return [1 << i for i in range(4, limit.bit_length()) if (1 << i) <= limit]


class _Buffers:
    """Persistent tensors where values cross between eager code and the graphs: one per (role, slot, dtype, shape
    with the token dim left out), sized for the largest bucket; each bucket uses a view at the same address."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.bases: dict[tuple, torch.Tensor] = {}

    def view(self, role: str, slot: int, like: torch.Tensor, token_dim: int | None) -> torch.Tensor:
        shape = tuple(like.shape)
        pattern = tuple(-1 if d == token_dim else s for d, s in enumerate(shape))
        key = (role, slot, like.dtype, pattern)
        per_row = math.prod(s for d, s in enumerate(shape) if d != token_dim)
        base = self.bases.get(key)
        if base is None:
            rows = self.max_tokens if token_dim is not None else 1
            base = self.bases[key] = torch.zeros(per_row * rows, dtype=like.dtype, device=like.device)
        return base[: math.prod(shape)].view(shape)


def _narrow(t: torch.Tensor, dim: int | None, n: int) -> torch.Tensor:
    return t if dim is None else t.narrow(dim, 0, n)


@dataclass
class _Replay:
    """One captured piece at one bucket: its replay, the inputs copied in before it, the outputs copied out."""

    replay: Callable[[], None]
    copies: list[tuple[str, torch.Tensor, int | None]]  # (value, buffer, token dim)
    outputs: list[tuple[torch.Tensor, int | None] | None]  # per output: (buffer, token dim) if eager code reads it
    single: bool  # the piece returns one value, not a tuple

    def run(self, env: dict[str, Any], tokens: int) -> Any:
        for name, buf, dim in self.copies:
            _narrow(buf, dim, tokens).copy_(env[name])
        self.replay()
        outs = [None if o is None else _narrow(o[0], o[1], tokens) for o in self.outputs]
        return outs[0] if self.single else tuple(outs)


@dataclass
class _Plan:
    """What the split graph's top-level nodes are, found once: last uses and constants, then (after the probes)
    the captured pieces and the values eager code reads."""

    nodes: list[Node]
    last_use: dict[str, int] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    captured: set[str] = field(default_factory=set)
    eager_read: set[str] = field(default_factory=set)  # values read by eager code (eager pieces, the graph output)


def cuda_capturer(pool: Any) -> Capturer:
    """Capture `fn` into a CUDA graph sharing `pool`: returns (replay, fn's outputs at their fixed addresses)."""

    def capture(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (FlashInfer's sampling loader) may not void the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out

    return capture


def emulated_capturer(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
    """What a CUDA graph does, on any device: replay reruns `fn` and the first outputs' tensor objects take the new
    results, as a graph's outputs keep their addresses (tests on a CPU; CUDA graphs cannot be captured there)."""
    out = fn()

    def replay() -> None:
        new = fn()
        for o, n in zip(flat_values(out), flat_values(new)):
            if isinstance(o, torch.Tensor):
                o.set_(n)  # the same tensor objects now show the new values (an expanded output takes no copy_)

    return replay, out


class PiecewiseGraphs(nn.Module):
    """Runs prefill and mixed steps of up to max(num_tokens) tokens through piecewise graphs; other steps (decode
    only, or longer) through `fallback`."""

    def __init__(self, gm: GraphModule, cm: CachedSequenceInterface, num_tokens: list[int], fallback: nn.Module,
                 capturer: Capturer | None = None):
        super().__init__()
        self.fallback = fallback
        self.cm = cm
        limit = min(cm.info.max_num_tokens, cm.info.max_seq_len)
        self.num_tokens = sorted({t for t in num_tokens if 1 < t <= limit})
        if limit < PROBE_TOKENS[1] and self.num_tokens:
            logger.info("piecewise CUDA graphs off: a step holds %d tokens, the probes need %d", limit, PROBE_TOKENS[1])
            self.num_tokens = []
        self.num_replays = 0  # steps served by the pieces (observability; tests check it)
        self.replays: dict[int, dict[str, _Replay]] = {}
        if not self.num_tokens:
            return
        t0 = time.perf_counter()
        self.split, eager = split_at_eager_nodes(gm)
        self.split.graph._codegen = gm.graph._codegen  # outputs come back in the graph's own structure
        for name in eager:  # eager pieces run every step: skip the dispatcher for Python custom ops
            call_custom_ops_directly(getattr(self.split, name))
        self.plan = _Plan(list(self.split.graph.nodes))
        for i, node in enumerate(self.plan.nodes):
            self.plan.last_use.update((a.name, i) for a in node.all_input_nodes)
            if node.op == "get_attr":
                self.plan.consts[node.name] = get_attr_tensor(self.split, node.target)
        with torch.inference_mode():
            self.shapes = probe_shapes(self._probe, cm.info.max_batch_size)
            self._choose_captured(eager)
            self.buffers = _Buffers(self.num_tokens[-1])
            capture = capturer or cuda_capturer(torch.cuda.graph_pool_handle())
            try:
                for t in reversed(self.num_tokens):  # largest first: smaller ones reuse its pool memory
                    self.replays[t] = self._capture_bucket(t, capture)
            except Exception as e:  # noqa: BLE001 - e.g. an op that syncs with the host cannot be captured
                # The model ran before without these graphs: keep it running so, and say why, once.
                logger.warning("piecewise CUDA graphs off: capturing a piece failed (%s: %s); prefill and mixed "
                               "steps run without them", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.replays.clear()
                self.num_tokens = []
                self.buffers = _Buffers(0)  # their memory goes back
                return
        logger.info("piecewise CUDA graphs: %d pieces (%d eager) x %d token sizes %s, captured in %.1f s",
                    len(self.plan.captured) + len(eager), len(eager), len(self.num_tokens), self.num_tokens,
                    time.perf_counter() - t0)

    @property
    def num_pieces_captured(self) -> int:
        return len(self.plan.captured) if self.replays else 0

    def covers(self, num_tokens: int) -> bool:
        return bool(self.num_tokens) and num_tokens <= self.num_tokens[-1]

    def forward(self, **kwargs: torch.Tensor) -> Any:
        tokens = kwargs["input_ids"].shape[-1]
        if self.cm.info.is_decode_only or not self.covers(tokens):
            return self.fallback(**kwargs)
        replays = self.replays[self.num_tokens[bisect.bisect_left(self.num_tokens, tokens)]]

        def piece(_: int, node: Node, env: dict[str, Any]) -> Any:
            rep = replays.get(node.name)
            return rep.run(env, tokens) if rep is not None else self._eager(node, env)

        with torch.inference_mode():  # the buffers were made under it (as GraphRunner runs every step)
            out = self._walk(kwargs, piece)
        self.num_replays += 1
        return out

    def _walk(self, kwargs: dict[str, Any], piece: Callable[[int, Node, dict[str, Any]], Any], free: bool = False,
              env: dict[str, Any] | None = None) -> Any:
        """Run the split graph's top level: inputs, constants and tuple items here, each piece by `piece(index,
        node, env)`; `env` (if given) keeps every value. With `free`, a value is dropped after its last reader
        (while capturing: its pool memory then serves later pieces)."""
        plan, env = self.plan, ({} if env is None else env)
        for i, node in enumerate(plan.nodes):
            name = node.name
            if node.op == "placeholder":
                env[name] = kwargs[name]
            elif node.op == "get_attr":
                env[name] = plan.consts[name]
            elif node.op == "output":
                return self.split.graph._codegen.process_outputs(torch.fx.node.map_arg(node.args[0],
                                                                                      lambda a: env[a.name]))
            elif node.op == "call_module":
                env[name] = piece(i, node, env)
            else:  # operator.getitem
                env[name] = env[node.args[0].name][node.args[1]]
            if free:
                for a in node.all_input_nodes:
                    if plan.last_use[a.name] == i and a.op not in ("placeholder", "get_attr"):
                        env.pop(a.name, None)
        raise RuntimeError("the split graph has no output node")

    def _eager(self, node: Node, env: dict[str, Any]) -> Any:
        return getattr(self.split, node.target)(*[env[a.name] for a in node.args])

    # ---- build -----------------------------------------------------------------------------------------------

    def _dummy_step(self, lengths: list[int]) -> dict[str, torch.Tensor]:
        """A step of sequences of these lengths on the scratch page: valid inputs that touch no real cache data."""
        self.cm.update_columns(*self.cm.info.dummy_columns(lengths))
        return self.cm.named_args

    def _probe(self, lengths: list[int]) -> dict[str, Any]:
        """Every top-level value of one eager run on a dummy step of these lengths (probe_shapes' input)."""
        env: dict[str, Any] = {}
        self._walk(self._dummy_step(lengths), lambda _, node, e: self._eager(node, e), env=env)
        return env

    def _choose_captured(self, eager: set[str]) -> None:
        """Captured pieces: those not eager whose edges the probes found static or token-sized; then the values
        eager code reads (copied out of the graphs into buffers)."""
        plan = self.plan
        pieces = [n for n in plan.nodes if n.op == "call_module" and n.name not in eager]
        plan.captured = {n.name for n in pieces if self._capturable(n)}
        for node in plan.nodes:
            if node.op == "output" or (node.op == "call_module" and node.name not in plan.captured):
                plan.eager_read.update(a.name for a in node.all_input_nodes)
        demoted = sorted(n.name for n in pieces if n.name not in plan.captured)
        if demoted:
            logger.info("piecewise CUDA graphs: pieces %s run eagerly (a value crossing them depends on more "
                        "than the token count)", demoted)

    def _capturable(self, node: Node) -> bool:
        """Every value crossing the piece's edges is static or grows with the token count only."""
        crossing = [a.name for a in node.all_input_nodes if a.op != "get_attr"]
        crossing += [u.name for u in node.users if u.target is operator.getitem] or [node.name]
        return all(self.shapes.capturable(v) for v in crossing)

    def _capture_bucket(self, tokens: int, capture: Capturer) -> dict[str, _Replay]:
        """Run one dummy step of `tokens` tokens, capturing each captured piece as it comes."""
        replays: dict[str, _Replay] = {}
        out_slots: dict[tuple, int] = {}  # (buffer kind, slot) -> index of the last node reading its value

        def piece(i: int, node: Node, env: dict[str, Any]) -> Any:
            if node.name not in self.plan.captured:
                return self._eager(node, env)
            replays[node.name], out = self._capture_piece(i, node, env, capture, out_slots)
            return out

        self._walk(self._dummy_step([tokens]), piece, free=True)
        return replays

    def _capture_piece(self, index: int, node: Node, env: dict[str, Any], capture: Capturer,
                       out_slots: dict[tuple, int]) -> tuple[_Replay, Any]:
        piece, plan, shapes = getattr(self.split, node.target), self.plan, self.shapes
        ins, copies = [], []
        for a in node.args:
            value = env[a.name]
            if isinstance(value, torch.Tensor) and a.op != "get_attr" and _producer(a) not in plan.captured:
                dim = shapes.token_dim(a.name)
                buf = self.buffers.view("in", len(copies), value, dim)
                buf.copy_(value)
                copies.append((a.name, buf, dim))
                value = buf
            ins.append(value)
        warm = flat_values(piece(*ins))  # Triton's first compiles and cuBLAS workspaces happen outside the capture
        outputs = []
        for k, (value_name, readers_end) in enumerate(self._output_reads(node, len(warm))):
            if readers_end is None or not isinstance(warm[k], torch.Tensor):
                outputs.append(None)
                continue
            dim = shapes.token_dim(value_name)
            slot = _free_slot(out_slots, (warm[k].dtype, tuple(warm[k].shape), dim), index, readers_end)
            outputs.append((self.buffers.view("out", slot, warm[k], dim), dim))
        del warm

        def run() -> Any:
            out = piece(*ins)
            for o, target in zip(flat_values(out), outputs):
                if target is not None:
                    target[0].copy_(o)
            return out

        replay, out = capture(run)
        return _Replay(replay, copies, outputs, single=not isinstance(out, (tuple, list))), out

    def _output_reads(self, node: Node, n: int) -> list[tuple[str, int | None]]:
        """Per output of a captured piece: its value's name and the last node index where eager code reads it
        (None: only graphs read it, straight from the pool)."""
        items = {u.args[1]: u.name for u in node.users if u.op == "call_function"}
        names = [items.get(k, "") for k in range(n)] if items else [node.name]  # "": an output nothing reads
        return [(v, self.plan.last_use[v] if v in self.plan.eager_read else None) for v in names]


def _free_slot(slots: dict[tuple, int], key: tuple, start: int, end: int) -> int:
    """The first buffer slot of this kind whose value is no longer read at `start`; it is then held until `end`."""
    k = 0
    while slots.get((key, k), -1) >= start:
        k += 1
    slots[(key, k)] = end
    return k


def _producer(node: Node) -> str:
    """The top-level node that computed a value: the piece behind a tuple item, else the node."""
    if node.op == "call_function" and isinstance(node.args[0], Node) and node.args[0].op == "call_module":
        return node.args[0].name
    return node.name


__all__ = ["PiecewiseGraphs", "cuda_capturer", "default_piecewise_num_tokens", "emulated_capturer"]

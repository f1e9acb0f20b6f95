"""Precompute RoPE cos/sin once into a [max_pos, d] table and rotate with the backend's cached-table kernel."""

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...kernels_registry import get_kernel
from ...models.factory import ModelFactory
from ...utils.graph_utils import eliminate_dead_code, get_attr_tensor, nodes_calling, set_fake_val, val
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

DEFAULT_MAX_POS = 4096


def _ancestors(nodes: list[Node]) -> set[Node]:
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _cos_sin_program(gm: GraphModule, cos: Node, sin: Node) -> tuple[GraphModule, Node] | None:
    """A module computing (cos, sin) from the graph's one integer [b, s] input, and that input's node."""
    needed = _ancestors([cos, sin])
    inputs = [n for n in needed if n.op == "placeholder"]
    if len(inputs) != 1 or any(n.op not in ("placeholder", "get_attr", "call_function") for n in needed):
        return None
    pos = inputs[0]
    v = val(pos)
    if not isinstance(v, torch.Tensor) or v.dtype.is_floating_point or v.dim() != 2:
        return None
    graph = Graph()
    env: dict[Node, Node] = {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output((env[cos], env[sin]))
    return GraphModule(gm, graph), pos


def _build_cache(prog: GraphModule, max_pos: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """[max_pos, d] = [cos half | sin half], or None when cos/sin are not a per-position rotate-half table."""
    with torch.no_grad():
        cos, sin = prog(torch.arange(max_pos, device=device, dtype=dtype).unsqueeze(0))
        # The table is only valid if every row depends on its own position alone (no batch or length
        # effects): probe with a shuffled batch and compare to the rows picked from the table.
        gen = torch.Generator(device).manual_seed(0)
        probe = torch.randint(0, max_pos, (3, 7), device=device, dtype=dtype, generator=gen)
        p_cos, p_sin = prog(probe)
    if cos.dim() != 3 or cos.shape[:2] != (1, max_pos) or cos.shape[-1] % 2:
        return None
    cos, sin = cos[0], sin[0]
    if not (torch.equal(p_cos, cos[probe]) and torch.equal(p_sin, sin[probe])):
        return None
    h = cos.shape[-1] // 2
    # Rotate-half frequencies repeat: cos = cat(c, c). Keep one half, as flashinfer's layout does.
    if not (torch.equal(cos[:, :h], cos[:, h:]) and torch.equal(sin[:, :h], sin[:, h:])):
        return None
    return torch.cat([cos[:, :h], sin[:, :h]], dim=-1).contiguous()


def _device_of(prog: GraphModule, shared_config: SharedConfig) -> torch.device:
    for n in prog.graph.nodes:
        if n.op == "get_attr":
            return get_attr_tensor(prog, n.target).device
    return torch.device(shared_config.device)


def _max_positions(factory: ModelFactory | None, shared_config: SharedConfig) -> int:
    for v in (shared_config.extras.get("max_seq_len"), getattr(factory, "max_seq_len", None)):
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_MAX_POS


def _insert_lookup(gm: GraphModule, before: Node, pos: Node, table: Node) -> tuple[Node, Node]:
    """(cos, sin) nodes of one table lookup at `pos`, placed before the first rotation that reads them."""
    with gm.graph.inserting_before(before):
        lookup = gm.graph.call_function(torch.ops.auto_deploy.torch_cos_sin_table_lookup.default, (pos, table))
        set_fake_val(lookup)
        halves = [gm.graph.call_function(operator.getitem, (lookup, i)) for i in range(2)]
    for i, h in enumerate(halves):
        if "val" in lookup.meta:
            h.meta["val"] = lookup.meta["val"][i]
    return halves[0], halves[1]


@TransformRegistry.register("optimize_rope")
class OptimizeRope(BaseTransform):
    """Replace per-forward cos/sin computation by a lookup in a table built once at transform time.

    Before:  f = inv_freq @ position_ids; cos = cat(f, f).cos(); sin = ...;  torch_rope_with_explicit_cos_sin(q, k, cos, sin, d)
    After:   torch_rope_with_cos_sin_cache(q, k, position_ids, rope_cos_sin_cache_0, d)   # or the triton kernel
    With the torch backend the rows are looked up once per step instead, for every layer's explicit rotation:
             cos, sin = torch_cos_sin_table_lookup(position_ids, rope_cos_sin_cache_0)  (once)
             torch_rope_with_explicit_cos_sin(q, k, cos, sin, d)                       (per layer)
    The table is the graph's own cos/sin subgraph evaluated for positions 0..max_pos-1 (max_seq_len from
    shared_config.extras or the factory), so it is bit-equal to what the graph computed, in its dtype.
    It is a non-persistent buffer, so the state-dict keys stay the model's. Positions must stay below
    max_pos. Graphs whose cos/sin depend on anything but the position ids are left as they are.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        nodes = nodes_calling(gm, torch.ops.auto_deploy.torch_rope_with_explicit_cos_sin)
        if not nodes:
            return gm, TransformInfo(num_matches=0)
        kernel = get_kernel("rope", self.config.backend)
        max_pos = _max_positions(factory, shared_config)
        caches: dict[tuple[Node, Node], tuple[Node, Node] | None] = {}
        lookups: dict[tuple[Node, Node], tuple[Node, Node]] = {}  # (cos, sin) read once a step (torch backend)
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        num = 0
        for node in nodes:
            q, k, cos, sin = node.args[:4]
            dim = node.args[4] if len(node.args) > 4 else node.kwargs.get("unsqueeze_dim", 1)
            if (cos, sin) not in caches:
                caches[(cos, sin)] = None
                found = _cos_sin_program(gm, cos, sin)
                if found is None:
                    continue
                prog, pos = found
                # Export may have run on meta: the device is where the (loaded) buffers now live.
                device = _device_of(prog, shared_config)
                if device.type == "meta":
                    continue
                try:
                    table = _build_cache(prog, max_pos, device, val(pos).dtype)
                except Exception:  # noqa: BLE001 - weights still on meta or not evaluable: leave it
                    table = None
                if table is None:
                    continue
                name = f"rope_cos_sin_cache_{sum(c is not None for c in caches.values())}"
                gm.register_buffer(name, table, persistent=False)
                with gm.graph.inserting_before(first):
                    attr = gm.graph.get_attr(name)
                attr.meta["val"] = val(pos).fake_mode.from_tensor(table) if hasattr(val(pos), "fake_mode") else table
                caches[(cos, sin)] = (pos, attr)
            if caches[(cos, sin)] is None:
                continue
            pos, attr = caches[(cos, sin)]
            if kernel is torch.ops.auto_deploy.torch_rope_with_cos_sin_cache.default:
                # Plain torch: read the table once per step and keep each layer's explicit rotation (on the CPU,
                # where every op is a dispatch, that is 6 fewer ops a layer than looking the rows up per layer).
                if (cos, sin) not in lookups:
                    lookups[(cos, sin)] = _insert_lookup(gm, node, pos, attr)
                node.args = (q, k, *lookups[(cos, sin)], dim)
                num += 1
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(kernel, (q, k, pos, attr, dim))
            set_fake_val(new)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            num += 1
        eliminate_dead_code(gm)
        return gm, TransformInfo(num_matches=num)

"""After weights shrink, fix the size literals downstream (view heads, split sizes, conv groups) by propagation.

Every node is re-run on fake tensors in order. Where an op carries sizes and its input lost a factor along
one dim, the matching literal is divided by that factor, found from the pre-sharding shapes: a view keeps
the element count before the split dim, so the output dim starting at the same offset is the one to shrink.
"""

import math

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import size_hint

from ..errors import CompileError
from ..utils.graph_utils import InputDeviceFakeProp, _fake_mode_of, is_op

aten = torch.ops.aten
_VIEWS = [aten.view.default, aten.reshape.default, aten._unsafe_view.default]
_FIXABLE = [*_VIEWS, aten.expand.default, aten.split_with_sizes.default, aten.split.Tensor, aten.conv1d.default,
            aten.repeat_interleave.self_int, aten.mean.dim]


def _ints(shape: torch.Size | tuple) -> tuple[int, ...]:
    return tuple(int(size_hint(s)) if not isinstance(s, int) else s for s in shape)


def _changed_dim(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, int] | None:
    """(dim, factor) of the single dim that shrank, None when nothing changed."""
    diff = [d for d, (o, n) in enumerate(zip(old, new)) if o != n]
    if not diff:
        return None
    if len(diff) > 1 or new[diff[0]] == 0 or old[diff[0]] % new[diff[0]]:
        raise CompileError(f"sharding changed shape {old} -> {new} in more than one dim")
    return diff[0], old[diff[0]] // new[diff[0]]


class _ShapeRepair(InputDeviceFakeProp):
    # Weights still on the meta device (loaded after sharding) and computed CPU buffers stand in as fakes on the
    # inputs' device (InputDeviceFakeProp.get_attr).
    def __init__(self, gm: GraphModule, old: dict[Node, tuple[int, ...]], mode: torch._subclasses.FakeTensorMode):
        super().__init__(gm, mode)
        self.old = old

    def _shrink(self, x: Node) -> tuple[int, int] | None:
        val = self.env.get(x)
        if x not in self.old or not isinstance(val, torch.Tensor):
            return None
        return _changed_dim(self.old[x], _ints(val.shape))

    def run_node(self, n: Node):
        if n.op == "call_function" and n.args and isinstance(n.args[0], Node) and is_op(n, _FIXABLE):
            change = self._shrink(n.args[0])
            if change is not None:
                self._fix(n, *change)
        return super().run_node(n)

    def _fix(self, n: Node, dim: int, factor: int) -> None:
        old_in = self.old[n.args[0]]
        if is_op(n, aten.mean.dim) and any(d % len(old_in) == dim for d in n.args[1]):
            # A mean over a sharded dim (e.g. a gated norm's variance) becomes a global one: sum, all-reduce, divide.
            import ad_compiler.custom_ops  # noqa: F401 - registers the collectives

            n.target = aten.sum.dim_IntList
            graph = n.graph
            with graph.inserting_after(n):
                reduced = graph.call_function(torch.ops.auto_deploy.torch_dist_all_reduce.default, (n,))
            with graph.inserting_after(reduced):
                mean = graph.call_function(aten.div.Tensor, (reduced, old_in[dim]))
            n.replace_all_uses_with(mean, delete_user_cb=lambda u: u is not reduced)
            return
        if is_op(n, _VIEWS):
            old_out = self.old.get(n)
            prefix = math.prod(old_in[:dim])
            for k in range(len(old_out)):
                if math.prod(old_out[:k]) == prefix and old_out[k] % factor == 0 and old_out[k] != 1:
                    _shrink_size(n, k, factor)
                    return
            raise CompileError(f"cannot rescale {n.name} {old_in} -> {old_out} after sharding dim {dim}")
        if is_op(n, aten.expand.default):
            _shrink_size(n, len(n.args[1]) - len(old_in) + dim, factor)
        elif is_op(n, aten.split_with_sizes.default) and self._is_dim(n, 2, dim, len(old_in)):
            n.args = (n.args[0], [int(s) // factor for s in n.args[1]], *n.args[2:])
        elif is_op(n, aten.split.Tensor) and self._is_dim(n, 2, dim, len(old_in)):
            n.args = (n.args[0], int(n.args[1]) // factor, *n.args[2:])
        elif is_op(n, aten.repeat_interleave.self_int) and n.kwargs.get("output_size") is not None:
            if self._is_dim(n, 2, dim, len(old_in)):
                n.kwargs = {**n.kwargs, "output_size": int(n.kwargs["output_size"]) // factor}
        elif is_op(n, aten.conv1d.default) and len(n.args) > 6 and dim == 1 and n.args[6] > 1:
            n.args = (*n.args[:6], n.args[6] // factor)

    @staticmethod
    def _is_dim(n: Node, index: int, dim: int, ndim: int) -> bool:
        d = n.args[index] if len(n.args) > index else n.kwargs.get("dim", 0)
        return d % ndim == dim


def _shrink_size(n: Node, k: int, factor: int) -> None:
    """Divide size `k` of a view/expand node's size list by `factor` (a -1 or symbolic size adapts by itself)."""
    sizes = list(n.args[1])
    if isinstance(sizes[k], int) and sizes[k] != -1:
        sizes[k] //= factor
    n.args = (n.args[0], sizes, *n.args[2:])


def repair_shapes(gm: GraphModule, world_size: int) -> GraphModule:
    """Rescale literals that no longer fit the local shards; refreshes every node's meta['val']."""
    old = {n: _ints(n.meta["val"].shape) for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    mode = _fake_mode_of(gm)
    mode.allow_non_fake_inputs = True
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    with mode:
        _ShapeRepair(gm, old, mode).propagate_dont_convert_inputs(*inputs)
    gm.recompile()
    return gm

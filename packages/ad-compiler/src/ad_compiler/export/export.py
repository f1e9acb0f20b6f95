"""torch.export capture into a GraphModule whose state-dict keys equal the source model's."""

import contextlib
import logging
import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.export import Dim
from torch.fx import GraphModule, Node

from ..errors import CompileError
from ..utils.graph_utils import nodes_calling
from .patches import apply_export_patches

logger = logging.getLogger(__name__)

# Higher-order ops that export wraps around `torch.no_grad()` / autocast regions (HF rotary code has both).
# For inference they are plain code, and matchers must see the ops inside, so we inline them.
_WRAPPER_HOPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def dynamic_batch_seq_shapes(kwargs: dict[str, torch.Tensor]) -> dict[str, dict[int, Any]]:
    """Dim.DYNAMIC for dims 0 and 1 of every input: a named Dim with a max trips guards in HF rotary code."""
    return {k: {0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for k in kwargs}


@contextlib.contextmanager
def _buffers_on_meta(model: nn.Module, enabled: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Trace with every buffer on meta (inputs are meta); yield the real buffers to put back afterwards.

    A model built with parameters on meta keeps computed buffers (rotary inv_freq) real, since no
    checkpoint holds them; mixing devices would fail inside the trace.
    """
    saved: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    if enabled:
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    fqn = f"{mod_name}.{name}" if mod_name else name
                    saved[fqn] = (mod, name, buf)
                    mod._buffers[name] = buf.to("meta")
    try:
        yield {fqn: buf for fqn, (_, _, buf) in saved.items()}
    finally:
        for mod, name, buf in saved.values():
            mod._buffers[name] = buf


def _set_buffer(gm: nn.Module, fqn: str, value: torch.Tensor) -> None:
    owner_name, _, name = fqn.rpartition(".")
    try:
        owner = gm.get_submodule(owner_name) if owner_name else gm
    except AttributeError:
        return
    if name in owner._buffers:
        owner._buffers[name] = value


def _wrapper_hop_targets() -> set[Any]:
    return {getattr(torch.ops.higher_order, n) for n in _WRAPPER_HOPS if hasattr(torch.ops.higher_order, n)}


def inline_wrapper_hops(gm: GraphModule) -> int:
    """Inline `wrap_with_set_grad_enabled` / `wrap_with_autocast` submodules into `gm`; return how many."""
    targets = _wrapper_hop_targets()
    count = 0
    while True:
        node = next((n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets), None)
        if node is None:
            return count
        sub_idx = next(
            i
            for i, a in enumerate(node.args)
            if isinstance(a, Node) and a.op == "get_attr" and isinstance(getattr(gm, str(a.target)), GraphModule)
        )
        sub: GraphModule = getattr(gm, str(node.args[sub_idx].target))
        operands = list(node.args[sub_idx + 1 :])
        env: dict[Node, Any] = {}
        outputs: Any = None
        with gm.graph.inserting_before(node):
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            env.update(zip(placeholders, operands, strict=True))
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    outputs = n.args[0]
                    break
                if n.op == "get_attr":
                    # Re-home the submodule's attribute on the parent under a fresh name.
                    new_name = f"_inlined_{count}_{str(n.target).replace('.', '_')}"
                    setattr(gm, new_name, getattr(sub, str(n.target)))
                    env[n] = gm.graph.get_attr(new_name)
                    env[n].meta = dict(n.meta)
                    continue
                env[n] = gm.graph.node_copy(n, lambda x: env[x])
        mapped = [env[o] if isinstance(o, Node) else o for o in outputs]
        for user in list(node.users):
            assert user.target is operator.getitem, f"unexpected user of {node}: {user}"
            user.replace_all_uses_with(mapped[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()


def remove_tensor_metadata_asserts(gm: GraphModule) -> int:
    """Drop `aten._assert_tensor_metadata` nodes: they pin the trace device (meta), so the graph would
    refuse real tensors after weight loading."""
    nodes = nodes_calling(gm, torch.ops.aten._assert_tensor_metadata.default)
    for n in nodes:
        gm.graph.erase_node(n)
    return len(nodes)


def torch_export_to_gm(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
    patch_list: list[str] | None = None,
    clone_state_dict: bool = False,
) -> GraphModule:
    """Export `model` and return the unlifted GraphModule (parameters as attributes, aten ops).

    - `dynamic_shapes` None: batch and sequence (dims 0, 1) of every keyword input are Dim.DYNAMIC.
    - `patch_list`: export patches to apply around the trace (None: all registered, [] none).
    - Buffers that are real while the inputs are meta (see `_buffers_on_meta`) come back real in the result.
    - `clone_state_dict`: the result owns copies of the parameters instead of sharing the model's.
    """
    kwargs = dict(kwargs or {})
    if dynamic_shapes is None and kwargs and not args:
        dynamic_shapes = dynamic_batch_seq_shapes(kwargs)
    inputs_on_meta = any(t.device.type == "meta" for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
    try:
        with (
            _buffers_on_meta(model, enabled=inputs_on_meta) as real_buffers,
            apply_export_patches(patch_list),
            torch.inference_mode(False),
            torch.no_grad(),
            # Without it torch.export drops `torch.fx.traceback.annotate` metadata (hf_sdpa_attention's window).
            torch.fx.traceback.preserve_node_meta(),
        ):
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    except CompileError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; name the model and the way out
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompileError(
            f"torch.export failed for {type(model).__name__} ({'strict' if strict else 'non-strict'}): "
            f"{type(e).__name__}: {first}. Try transforms.export_to_gm.strict={str(not strict).lower()} "
            "or an export patch for the failing model code."
        ) from e
    gm = ep.module()
    inline_wrapper_hops(gm)
    remove_tensor_metadata_asserts(gm)
    for fqn, buf in real_buffers.items():
        _set_buffer(gm, fqn, buf)
    if clone_state_dict:
        clones: dict[int, nn.Parameter] = {}  # by identity, so tied parameters stay tied
        for name, p in list(gm.named_parameters(remove_duplicate=False)):
            owner_name, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if id(p) not in clones:
                clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
            owner._parameters[attr] = clones[id(p)]
    gm.recompile()
    return gm

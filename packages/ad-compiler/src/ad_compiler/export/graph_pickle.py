"""A transformed GraphModule as bytes and back: code, node metadata (fake tensors, symbolic shapes), meta weights.

torch's own GraphPickler does the work. Operators are stored by name (`torch.ops.auto_deploy.torch_attention.default`),
so loading needs them registered again (`import ad_compiler` and, for runtime ops, `import ad_runtime`). Parameters
on meta are stored as shapes only; real buffers (rotary `inv_freq`) are small and stored with their values.
"""

import collections
import pickle
import warnings
from typing import Any

from torch.fx import GraphModule

from ..errors import CompileError
from ..sharding.load_hooks import SPECS_ATTR, register_shard_load_hook, shard_specs

# Instance attributes that `ep.module()` sets on its stateful GraphModule: local functions (train/eval refusals)
# that cannot be pickled and mean nothing to a graph we only run for inference.
_EXPORT_ONLY_ATTRS = ("train", "eval", "_graph", SPECS_ATTR)
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_load_state_dict_pre_hooks",
)
# Export's forward hooks: toggles for nn.Module-typed inputs (our inputs are tensors) and the input-range check
# that cleanup_input_constraints removes. Anything else is a hook we cannot restore: refuse rather than drop it.
_KNOWN_HOOK_SOURCES = ("torch.export._unlift",)
# Node metadata that only points back at Python source (frames, functions): not needed by any later transform.
_DROPPED_NODE_META = ("source_fn_stack", "fwd_source_fn_stack", "stack_trace")


def _check_hooks(gm: GraphModule) -> None:
    for attr in ("_forward_pre_hooks", "_forward_hooks"):
        for hook in getattr(gm, attr).values():
            if getattr(hook, "__module__", "") not in _KNOWN_HOOK_SOURCES:
                raise CompileError(f"cannot save the graph: it carries a forward hook {hook!r} that would be lost")
    for hook in gm._load_state_dict_pre_hooks.values():
        # The sharding load hook is restored from its specs; any other load hook would be lost.
        fn = getattr(hook, "hook", hook)
        if getattr(fn, "__module__", "") != "ad_compiler.sharding.load_hooks":
            raise CompileError(f"cannot save the graph: it carries a load_state_dict hook {fn!r} that would be lost")
    for name, sub in gm.named_modules():
        if name and (sub._forward_pre_hooks or sub._forward_hooks or sub._load_state_dict_pre_hooks):
            raise CompileError(f"cannot save the graph: submodule {name!r} carries hooks that would be lost")


def dumps_graph(gm: GraphModule) -> bytes:
    """Serialise `gm` (unchanged) into bytes that `loads_graph` turns back into an equivalent GraphModule."""
    from torch.fx._graph_pickler import GraphPickler, Options

    _check_hooks(gm)
    # A plain GraphModule shell over the same graph and state, without what cannot or need not be pickled.
    shell = GraphModule.__new__(GraphModule)
    state = {k: v for k, v in gm.__dict__.items() if k not in _EXPORT_ONLY_ATTRS}
    for attr in _HOOK_DICTS:
        state[attr] = collections.OrderedDict()
    shell.__dict__.update(state)
    shell._graph = gm.graph
    options = Options(ops_filter=None, node_metadata_key_filter=lambda key: key not in _DROPPED_NODE_META)
    graph_bytes = GraphPickler.dumps(shell, options)
    return pickle.dumps({"graph": graph_bytes, "shard_specs": shard_specs(gm)}, protocol=pickle.HIGHEST_PROTOCOL)


def loads_graph(data: bytes) -> GraphModule:
    """The GraphModule that `dumps_graph` saved, with fresh fake tensors and its sharding load hook restored."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from .. import custom_ops  # noqa: F401 - the graph names torch.ops.auto_deploy.* operators

    saved: dict[str, Any] = pickle.loads(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own unpickler of pytree specs (LeafSpec)
        gm = GraphPickler.loads(saved["graph"], FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True))
    if not isinstance(gm, GraphModule):
        raise CompileError(f"saved graph holds a {type(gm).__name__}, not a GraphModule")
    if saved["shard_specs"]:
        register_shard_load_hook(gm, saved["shard_specs"])
    gm.recompile()
    return gm


__all__ = ["dumps_graph", "loads_graph"]

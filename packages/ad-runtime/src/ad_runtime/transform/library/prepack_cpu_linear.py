"""prepack_cpu_linear: on a CPU, linear layers run through oneDNN with their weights packed once, at build time.

Before:  y = aten.linear(x, weight, bias)                                   (MKL, weight as stored)
After:   y = mkldnn._linear_pointwise(x, packed, bias, "none", [], "")      (packed: oneDNN's blocked layout)
or, with one_row_dense (the default):
         y = auto_deploy::cpu_packed_linear(x, weight, packed, bias)        (one row: MKL, more: oneDNN packed)

A decode step multiplies a few rows by every weight matrix: on the 2-core development VM MKL reached ~10 GB/s on
those products and oneDNN with packed weights ~16 GB/s, the tied LM head of the bundled model (49,152 x 576) up to
3x faster at batch 8 (benchmarks/README.md). On the same VM in its eleventh session MKL's one-row product was the
faster one (42 against 52 ms a SmolLM2 step), so by default each weight keeps its dense tensor for one-row calls
beside the packed one for more rows (one_row_dense: a second copy of the linear weights). Without it, a weight that
only linears read is replaced by its packed form; one read elsewhere too (a tied embedding) keeps its dense tensor.
"""

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import get_attr_tensor, nodes_calling
from torch.fx import GraphModule, Node

from ...kernels import cpu_linear  # noqa: F401 - defines auto_deploy::cpu_packed_linear

if TYPE_CHECKING:
    from ad_config import LlmArgs

logger = logging.getLogger(__name__)

PACKED_OP = "_linear_pointwise"


def onednn_problem() -> str | None:
    """Why oneDNN's packed linear cannot run in this torch build, or None."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, PACKED_OP) or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build lacks mkldnn._linear_pointwise / _reorder_linear_weight"
    return None


def _packable(gm: GraphModule, node: Node, device: str = "cpu") -> tuple[Node, Node | None] | None:
    """(weight, bias) get_attr nodes of a float32 linear whose weight and bias are module tensors, else None.

    `device`: where the weight must live ("meta" while planning, before the weights are loaded)."""
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if not isinstance(weight, Node) or weight.op != "get_attr":
        return None
    if bias is not None and (not isinstance(bias, Node) or bias.op != "get_attr"):
        return None
    w = get_attr_tensor(gm, weight.target)
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != device or w.layout != torch.strided:
        return None
    return weight, bias


def skip_reason(device: str | torch.device | None, compile_backend: str | None) -> str | None:
    """Why packing does not apply to a graph run on `device` by `compile_backend`, or None where it does."""
    if device is None:
        return "no cache interface: the graph is not built to run here"
    if torch.device(device).type != "cpu":
        return f"the model runs on {device}, not a CPU"
    if compile_backend not in (None, "torch-simple"):
        # Inductor cannot trace oneDNN's opaque packed tensors; it packs weights itself where it helps.
        return f"compile backend {compile_backend} compiles the linears itself"
    return onednn_problem()


def keeps_dense(args: "LlmArgs") -> bool:
    """Whether packed linears keep their dense weights too (one_row_dense), so that the memory plan counts both."""
    cfg = args.transforms.get("prepack_cpu_linear")
    return cfg is not None and cfg.one_row_dense


def will_run(args: "LlmArgs", device: torch.device) -> bool:
    """Whether a build with these args on `device` packs linears (the memory plan counts the copies it makes)."""
    from ...compile.backends import compile_backend_of

    cfg = args.transforms.get("prepack_cpu_linear")
    return cfg is not None and cfg.enabled and skip_reason(device, compile_backend_of(args, device)) is None


def packed_targets(gm: GraphModule, device: str = "meta") -> set[str]:
    """Module tensors (by name) whose linears the transform would pack (`device`: where the weights are now)."""
    found = (_packable(gm, node, device) for node in nodes_calling(gm, torch.ops.aten.linear.default))
    return {f[0].target for f in found if f is not None}


def _drop_attr(gm: GraphModule, target: str) -> None:
    """Remove a module tensor no node reads any more (its packed form replaced it)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    for table in (owner._parameters, owner._buffers):
        table.pop(name, None)
    if hasattr(owner, name):
        delattr(owner, name)


@TransformRegistry.register("prepack_cpu_linear")
class PrepackCpuLinear(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(mod, GraphModule):
            raise CompileError("prepack_cpu_linear needs an exported GraphModule")
        reason = skip_reason(getattr(cm, "device", None), shared_config.extras.get("compile_backend"))
        if reason is not None:
            if reason == onednn_problem():
                logger.info("prepack_cpu_linear: off (%s); linear layers run through MKL", reason)
            return mod, TransformInfo(skipped=True, reason=reason)
        gm = mod
        one_row_dense = self.config.one_row_dense
        packed: dict[str, str] = {}  # weight target -> packed buffer name
        num = 0
        for node in nodes_calling(gm, torch.ops.aten.linear.default):
            found = _packable(gm, node)
            if found is None:
                continue
            weight, bias = found
            name = packed.get(weight.target)
            if name is None:
                name = f"_onednn_packed_{len(packed)}"
                w = get_attr_tensor(gm, weight.target).detach()
                # No batch-size hint: packed for max_batch_size rows (8), SmolLM2's products with 8 rows took 1.5x
                # as long (gate_up 502 vs 302 us, qkv 168 vs 111 on the 2-core VM) and one row no less.
                gm.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(w), persistent=False)
                packed[weight.target] = name
            with gm.graph.inserting_before(node):
                w_node = gm.graph.get_attr(name)
                if one_row_dense:
                    new = gm.graph.call_function(torch.ops.auto_deploy.cpu_packed_linear.default,
                                                 (node.args[0], weight, w_node, bias))
                else:
                    new = gm.graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                                 (node.args[0], w_node, bias, "none", [], ""))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            num += 1
        # A dense weight nothing reads any more is freed; one still read (a tied embedding) stays.
        reads: dict[str, list[Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "get_attr" and n.target in packed:
                reads.setdefault(n.target, []).append(n)
        for target, nodes in reads.items():
            if all(not n.users for n in nodes):
                for n in nodes:
                    gm.graph.erase_node(n)
                _drop_attr(gm, target)
        gm.recompile()
        return gm, TransformInfo(num_matches=num)

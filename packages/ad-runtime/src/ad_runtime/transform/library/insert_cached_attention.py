"""insert_cached_attention: swap each torch_attention for the backend's paged cached op.

Before:  out = torch_attention(q, k, v, None, 0.0, True, scale, sinks, window, cap, "bsnd")     # [b, s, n, d]
After:   out = <backend>_cached_attention(q, k, v, *metadata, *prepared, k_cache_i, v_cache_i,
                                          sinks, scale, window, cap)                           # [1, T, n, d]
with new graph inputs for the metadata and the caches; the graph then runs on the flat [1, T] batch.
"""

import operator
from typing import Any

import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import add_graph_inputs, graph_inputs, nodes_calling
from ad_compiler.utils.unmatched_attention import find_unmatched_attention
from torch.fx import GraphModule, Node

from ...attention import AttentionRegistry, resolve_attention_backend
from ...attention.descriptor import attention_constants, source_op_args
from ...kv_cache.interface import CachedSequenceInterface
from ..graph_transform import GraphTransform


def _check_supported(node: Node) -> str:
    args = source_op_args(node)
    if args.get("attn_mask") is not None:
        raise CompileError(f"{node.name}: cached attention does not support an explicit attn_mask")
    if args.get("dropout_p", 0.0) not in (0, 0.0):
        raise CompileError(f"{node.name}: cached attention needs dropout_p == 0 (inference)")
    if not args.get("is_causal", True):
        raise CompileError(f"{node.name}: cached attention supports causal attention only")
    return args.get("layout", "bnsd")


def _refuse_unmatched_attention(gm: GraphModule) -> None:
    """Attention left in plain ops would get no KV cache: every token after the first would be wrong."""
    leftovers = find_unmatched_attention(gm)
    if leftovers:
        softmax, product = leftovers[0]
        raise CompileError(
            f"{len(leftovers)} attention subgraph(s) were not recognised as attention (e.g. softmax {softmax.name} "
            f"over scores {product.name}); they would decode without a KV cache. The model's attention code needs "
            "an export patch or a pattern in the match_*_attention transforms"
        )


def _transpose(gm: GraphModule, x: Any) -> Node:
    return gm.graph.call_function(torch.ops.aten.transpose.int, (x, 1, 2))


@TransformRegistry.register("insert_cached_attention")
class InsertCachedAttention(GraphTransform):
    def _rewrite(self, gm: GraphModule, cm: CachedSequenceInterface) -> tuple[GraphModule, TransformInfo]:
        desc = AttentionRegistry.get(resolve_attention_backend(self.config.backend, cm.device, cm.kv_cache_dtype))
        _refuse_unmatched_attention(gm)
        sources = nodes_calling(gm, desc.source_op())
        if not sources:
            return gm, TransformInfo(skipped=True, reason="no torch_attention in the graph")
        layouts = [_check_supported(n) for n in sources]

        example = cm.info.padded_decode_args(1)  # shapes of a one-sequence step, for meta["val"]
        names = list(desc.metadata_names())
        meta = dict(zip(names, graph_inputs(gm, names, [example[n].to("meta") for n in names])))
        for name in names:
            cm.add_metadata(name)
        cm.add_attention_backend(desc)
        prepared: list[Node] = []
        prep = desc.prepare_metadata()
        if prep is not None:
            with gm.graph.inserting_after(list(meta.values())[-1]):
                call = gm.graph.call_function(prep.op, tuple(meta[a] for a in prep.arg_names))
            with gm.graph.inserting_after(call):
                prepared = [gm.graph.call_function(operator.getitem, (call, i)) for i in range(prep.num_outputs)]

        for layer, (node, layout) in enumerate(zip(sources, layouts)):
            specs = desc.cache_specs(node)
            names = [f"{name}_{layer}" for name in specs]
            for name, spec in zip(names, specs.values()):
                cm.add_cache(name, spec)
            cache_vals = [torch.empty(cm.num_pages + 1, cm.page_size, sp.n_kv_heads, sp.head_dim,
                                      dtype=cm.cache_dtype(sp), device="meta") for sp in specs.values()]
            caches = add_graph_inputs(gm, names, cache_vals, recompile=False)  # recompiled once below
            args = source_op_args(node)
            consts = attention_constants(node)
            with gm.graph.inserting_before(node):
                q, k, v = args["query"], args["key"], args["value"]
                if layout == "bnsd":
                    q, k, v = (_transpose(gm, x) for x in (q, k, v))
                out = gm.graph.call_function(
                    desc.cached_op(),
                    (q, k, v, *meta.values(), *prepared, *caches, args.get("sinks"), consts.scale,
                     consts.sliding_window, consts.logit_cap),
                )
                if layout == "bnsd":
                    out = _transpose(gm, out)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(sources))

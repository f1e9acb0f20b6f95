"""fuse_rope_into_attention: the triton attention op rotates q and k in its cache write, with the same answers."""

import copy

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, tiny_llama

ROPE = torch.ops.auto_deploy.triton_rope_with_cos_sin_cache.default
ATTENTION = torch.ops.auto_deploy.triton_cached_attention.default
PROMPTS = [[3, 14, 15, 9, 2, 6, 5], [1, 7, 33], [42]]


@pytest.fixture(scope="module")
def device() -> str:
    try:
        use_interpreter_without_gpu()  # the triton attention backend runs here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def rope_graph(device: str):
    """tiny_llama with its RoPE as the Triton cos/sin-cache kernel, as post_load_fusion leaves it on a GPU."""
    gm = export_with_attention_ops(tiny_llama(device=device))
    conf = {"match_rope_pattern": {}, "match_rope_layout": {"expected_layout": "bsnd"},
            "optimize_rope": {"backend": "triton"}}
    gm = InferenceOptimizer(None, conf)(mod=gm)
    assert count_op(gm, ROPE) == 2
    return gm


def _build(gm, device: str, fuse: bool):
    extra = {"fuse_rope_into_attention": {}} if fuse else {}
    return build_cached(copy.deepcopy(gm), device=device, backend="triton", **extra)


@pytest.mark.parametrize("chunk", [None, 3])
def test_fused_graph_gives_the_same_logits_and_tokens(device, rope_graph, chunk):
    ref, ref_cm, _ = _build(rope_graph, device, fuse=False)
    mod, cm, hist = _build(rope_graph, device, fuse=True)
    assert hist["fuse_rope_into_attention"].num_matches == 2
    assert count_op(mod, ROPE) == 0 and count_op(mod, ATTENTION) == 2
    for node in mod.graph.nodes:
        if node.target is ATTENTION:  # q and k come before the rotation; the table and positions ride along
            assert node.args[-1].name == "position_ids" and node.args[-2].op == "get_attr"
    tokens, samples = greedy_cached(mod, cm, PROMPTS, steps=4, chunk=chunk)
    ref_tokens, ref_samples = greedy_cached(ref, ref_cm, PROMPTS, steps=4, chunk=chunk)
    assert tokens == ref_tokens
    for (i, ctx, logits), (ri, rctx, rlogits) in zip(samples, ref_samples, strict=True):
        assert (i, ctx) == (ri, rctx)
        torch.testing.assert_close(logits, rlogits, atol=0, rtol=0)


def test_other_attention_backends_are_left_alone(rope_graph):
    mod, _, hist = build_cached(copy.deepcopy(rope_graph), backend="torch", fuse_rope_into_attention={})
    assert hist["fuse_rope_into_attention"].skipped and count_op(mod, ROPE) == 2


def test_a_rotation_read_elsewhere_is_not_fused(device, rope_graph):
    gm = copy.deepcopy(rope_graph)
    rope = next(n for n in gm.graph.nodes if n.target is ROPE)
    q_rot = next(u for u in rope.users if u.args[1] == 0)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):  # a second reader of layer 0's rotated queries
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (q_rot,))
    out.args = ((out.args[0], extra),) if not isinstance(out.args[0], tuple) else (out.args[0] + (extra,),)
    gm.recompile()
    _, _, hist = build_cached(gm, device=device, backend="triton", fuse_rope_into_attention={})
    assert hist["fuse_rope_into_attention"].num_matches == 1

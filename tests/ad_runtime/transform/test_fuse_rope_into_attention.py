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


def test_llm_with_triton_attention_fuses_rope_and_generates_like_hf(device, tmp_path):
    """The whole build (verify_cached_decode, the CPU's direct op calls) with the fused op, against HF generate."""
    from ad_runtime import LLM, SamplingParams
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    prompts = [[5, 17, 99, 3], [200, 1, 7, 7, 42, 8, 9, 100, 11, 12, 13]]
    with LLM(model=str(tmp_path), skip_tokenizer_init=True, device=device, dtype="float32", max_seq_len=64,
             attn_page_size=8, max_batch_size=4, attn_backend="triton",
             transforms={"optimize_rope": {"backend": "triton"}}) as llm:
        if device == "cpu":  # the graph itself (a GPU build wraps it in CUDA graphs): its ops are called by name
            graph = llm.engine.runner.module.graph
            calls = [n for n in graph.nodes if "triton_cached_attention" in str(n.target)]
            assert len(calls) == 2 and all(len(n.args) == 18 for n in calls)  # q, k before RoPE; table, positions
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        ref = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
               for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == ref

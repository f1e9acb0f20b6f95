"""prepack_cpu_linear: on a CPU every float32 linear runs through oneDNN with packed weights, answering as before."""

from pathlib import Path

import pytest
import torch
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, get_attr_tensor
from ad_config import LlmArgs
from ad_runtime import LLM, SamplingParams
from ad_runtime.build import build_graph
from ad_runtime.kernels import cpu_linear
from ad_runtime.memory_plan import weight_bytes
from ad_runtime.transform.library.prepack_cpu_linear import onednn_problem  # also defines cpu_packed_linear
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, tiny_llama

pytestmark = pytest.mark.skipif(onednn_problem() is not None, reason=str(onednn_problem()))

COMMON = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_seq_len=64, attn_page_size=8,
              max_batch_size=4)
OFF = {"prepack_cpu_linear": {"enabled": False}}
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [4]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LINEAR = torch.ops.aten.linear.default
PACKED = torch.ops.mkldnn._linear_pointwise.default
ROW_DISPATCH = torch.ops.auto_deploy.cpu_packed_linear.default
row_dispatch_fn = cpu_linear.cpu_packed_linear._init_fn  # what the eager CPU graph calls instead of the op


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose LM head is its embedding (as SmolLM2's): the packed head is a copy beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_every_linear_is_packed_and_the_answers_stay(tied_model: Path) -> None:
    # packed only (one_row_dense false): the graph calls oneDNN on the packed weights, whose dense forms are gone
    packed_only = {"prepack_cpu_linear": {"one_row_dense": False}}
    module, _, _, report = build_graph(LlmArgs(model=str(tied_model), transforms=packed_only, **COMMON))
    dense, *_ = build_graph(LlmArgs(model=str(tied_model), transforms=OFF, **COMMON))
    assert count_op(module, LINEAR) == 0 and count_op(module, PACKED) == count_op(dense, LINEAR) > 0
    # The layers' dense weights are gone (replaced, not copied); the tied embedding stays for its lookup.
    params = dict(module.named_parameters())
    assert not [n for n in params if n.endswith("proj.weight")], list(params)
    assert any("embed_tokens" in n for n in params)
    # Memory: the plan counts the packed copy of the tied head and matches what the build holds.
    head = 512 * 64 * 4
    assert weight_bytes(dense) + head == weight_bytes(module)
    plan = report.memory.weight_bytes
    assert plan <= weight_bytes(module) <= 1.05 * plan  # later transforms add small tables (RoPE's cos/sin)
    dense_plan = build_graph(LlmArgs(model=str(tied_model), transforms=OFF, **COMMON))[3].memory.weight_bytes
    assert dense_plan + head == plan  # unpacked, the head shares the embedding's storage

    with LLM(model=str(tied_model), **COMMON) as packed, LLM(model=str(tied_model), transforms=OFF, **COMMON) as ref:
        got = [o.outputs[0].token_ids for o in packed.generate(PROMPTS, GREEDY)]
        want = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, GREEDY)]
    assert got == want


def test_one_row_dense_keeps_both_copies_and_the_plan_counts_them(tied_model: Path) -> None:
    module, _, _, report = build_graph(LlmArgs(model=str(tied_model), **COMMON))  # the default: one_row_dense
    dense, _, _, dense_report = build_graph(LlmArgs(model=str(tied_model), transforms=OFF, **COMMON))
    assert count_op(module, LINEAR) == 0 and count_op(module, PACKED) == 0
    # The eager CPU graph calls the op's Python function directly (compile/direct_calls.py).
    calls = [n for n in module.graph.nodes if n.op == "call_function" and n.target in (ROW_DISPATCH, row_dispatch_fn)]
    assert len(calls) == count_op(dense, LINEAR) > 0
    # Every dense weight stays (one-row products read it); the packed copies come on top, each linear's once.
    assert {n for n, _ in dense.named_parameters()} <= {n for n, _ in module.named_parameters()}
    packed_bytes = weight_bytes(module) - weight_bytes(dense)
    weights = {get_attr_tensor(dense, n.args[1].target) for n in dense.graph.nodes if n.target is LINEAR}
    assert packed_bytes == sum(w.numel() * 4 for w in weights)  # the layers' (fused) linears and the tied head
    plan = report.memory.weight_bytes
    assert plan <= weight_bytes(module) <= 1.05 * plan
    assert plan == dense_report.memory.weight_bytes + packed_bytes


def test_the_row_dispatch_answers_as_aten_for_one_row_and_more() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    for shape in ((1, 1, 16), (1, 5, 16), (3, 16)):
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(ROW_DISPATCH(x, w, packed, b), torch.nn.functional.linear(x, w, b),
                                   atol=1e-5, rtol=1e-5)


def test_logits_match_the_unpacked_graph() -> None:
    model = tiny_llama()
    ref, ref_cm, _ = build_cached(export_with_attention_ops(model))
    gm, cm, hist = build_cached(export_with_attention_ops(model), prepack_cpu_linear={})
    assert hist["prepack_cpu_linear"].num_matches == count_op(ref, LINEAR) > 0
    prompts = [[3, 1, 4, 1, 5], [2, 7]]
    (got, got_samples), (want, want_samples) = greedy_cached(gm, cm, prompts, 6), greedy_cached(ref, ref_cm, prompts, 6)
    assert got == want
    for (_, _, a), (_, _, b) in zip(got_samples, want_samples):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # oneDNN and MKL sum in different orders


@pytest.mark.parametrize(("device", "backend", "why"), [
    ("cpu", "torch-compile", "compiles the linears itself"),
    ("cuda", "torch-opt", "not a CPU"),
])
def test_skipped_where_it_cannot_help(device: str, backend: str, why: str) -> None:
    gm = export_with_attention_ops(tiny_llama())

    class _Cm:
        pass

    cm = _Cm()
    cm.device = torch.device(device)
    opt = InferenceOptimizer(None, {"prepack_cpu_linear": {}})
    out = opt(cm=cm, mod=gm, shared_config=SharedConfig(device=device, extras={"compile_backend": backend}))
    info = opt.history["prepack_cpu_linear"]
    assert info.skipped and why in info.reason, info
    assert count_op(out, LINEAR) > 0 and count_op(out, PACKED) == 0

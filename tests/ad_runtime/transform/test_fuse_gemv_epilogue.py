"""fuse_gemv_epilogue: the add+RMSNorm after a one-row GEMV runs in that GEMV's last program, same answers."""

import copy
from types import SimpleNamespace

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from tiny_llama import VOCAB, export_with_attention_ops, tiny_llama

GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm.default
GEMV_NORM = torch.ops.auto_deploy.triton_gemv_add_rmsnorm.default
LAYERS = 2  # tiny_llama's


@pytest.fixture(scope="module")
def device() -> str:
    try:
        use_interpreter_without_gpu()  # the rewritten graphs run here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gemv_graph(device: str):
    """tiny_llama as the compile stage sees it on a GPU: merged GEMMs, Triton add+RMSNorm, GEMV linears."""
    gm = export_with_attention_ops(tiny_llama(device=device))
    conf = {"match_rmsnorm_pattern": {}, "fuse_gemms": {}, "fuse_add_rmsnorm": {"backend": "triton"}}
    gm = InferenceOptimizer(None, conf)(mod=gm)
    return InferenceOptimizer(None, {"gemv_decode_linear": {}})(cm=SimpleNamespace(device="cuda"), mod=gm)


def _epilogue(gm):
    return InferenceOptimizer(None, {"fuse_gemv_epilogue": {}})(cm=SimpleNamespace(device="cuda"),
                                                                  mod=copy.deepcopy(gm))


def test_norms_after_gemvs_move_into_them_with_the_same_answers(device, gemv_graph, monkeypatch):
    ref = gemv_graph
    gemvs = count_op(ref, GEMV)
    # o_proj before each post-attention norm, down before the next layer's input norm and before the final norm.
    assert count_op(ref, ADD_RMSNORM) == 2 * LAYERS
    gm = _epilogue(ref)
    assert count_op(gm, GEMV_NORM) == 2 * LAYERS and count_op(gm, ADD_RMSNORM) == 0
    assert count_op(gm, GEMV) == gemvs - 2 * LAYERS
    calls = []
    real = gemv_module.gemv_add_rmsnorm
    monkeypatch.setattr(gemv_module, "gemv_add_rmsnorm", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 1), (1, 5), (3, 1)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)
        pos = torch.arange(seq, device=device).expand(batch, seq) + 3
        calls.clear()
        with torch.no_grad():
            assert torch.equal(gm(input_ids=ids, position_ids=pos), ref(input_ids=ids, position_ids=pos))
        # One row (batch-1 decode) takes the fused kernel; more rows run the unfused kernels.
        assert len(calls) == (2 * LAYERS if batch * seq == 1 else 0)


def test_a_gemv_read_by_two_ops_stays_unfused(gemv_graph):
    ref = copy.deepcopy(gemv_graph)  # edited below
    norm = next(n for n in ref.graph.nodes if n.target is ADD_RMSNORM)
    gemv = next(a for a in norm.args[:2] if a.target is GEMV)
    with ref.graph.inserting_after(gemv):
        extra = ref.graph.call_function(torch.ops.aten.neg.default, (gemv,))
    out = next(n for n in ref.graph.nodes if n.op == "output")
    out.args = ((out.args[0], extra),)  # a second reader of the GEMV's output
    ref.recompile()
    gm = _epilogue(ref)
    assert count_op(gm, GEMV_NORM) == 2 * LAYERS - 1 and count_op(gm, ADD_RMSNORM) == 1


def test_graphs_without_gemvs_are_left_alone():
    gm = export_with_attention_ops(tiny_llama())
    before = str(gm.graph)
    assert str(_epilogue(gm).graph) == before

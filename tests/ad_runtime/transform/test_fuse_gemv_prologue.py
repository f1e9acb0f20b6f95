"""fuse_gemv_prologue: add+RMSNorm and SiLU-and-multiply move into the GEMV they feed, with the same answers."""

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
NORM_GEMV = torch.ops.auto_deploy.triton_add_rmsnorm_gemv_linear.default
SWIGLU_GEMV = torch.ops.auto_deploy.triton_swiglu_gemv_linear.default
SILU = torch.ops.aten.silu.default
LAYERS = 2  # tiny_llama's


@pytest.fixture(scope="module")
def device() -> str:
    try:
        use_interpreter_without_gpu()  # the rewritten graphs run here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gemv_graph(device: str):
    """tiny_llama as the compile stage sees it on a GPU: merged GEMMs, Triton add+RMSNorm, GEMV linears."""
    gm = export_with_attention_ops(tiny_llama(device=device))
    conf = {"match_rmsnorm_pattern": {}, "fuse_gemms": {}, "fuse_add_rmsnorm": {"backend": "triton"}}
    gm = InferenceOptimizer(None, conf)(mod=gm)
    return InferenceOptimizer(None, {"gemv_decode_linear": {}})(cm=SimpleNamespace(device="cuda"), mod=gm)


@pytest.fixture(scope="module")
def gemv_graph(device: str):
    return _gemv_graph(device)


def _prologue(gm, **options):
    cm = SimpleNamespace(device="cuda")
    return InferenceOptimizer(None, {"fuse_gemv_prologue": options})(cm=cm, mod=copy.deepcopy(gm))


def test_norms_and_swiglus_move_into_their_gemvs_with_the_same_answers(device, gemv_graph, monkeypatch):
    ref = gemv_graph
    norms, gemvs = count_op(ref, ADD_RMSNORM), count_op(ref, GEMV)
    # A residual add + norm before each layer's gate_up and each later layer's qkv, and the final one (the first
    # layer's input norm has no residual add). The final norm reaches the LM head through a slice: it stays.
    assert norms == 2 * LAYERS and count_op(ref, SILU) == LAYERS
    gm = _prologue(ref)
    fused = norms - 1
    assert count_op(gm, NORM_GEMV) == fused and count_op(gm, SWIGLU_GEMV) == LAYERS
    assert count_op(gm, ADD_RMSNORM) == 1 and count_op(gm, SILU) == 0
    assert count_op(gm, GEMV) == gemvs - fused - LAYERS
    fused_calls = []
    for name in ("add_rmsnorm_gemv", "swiglu_gemv"):
        real = getattr(gemv_module, name)
        monkeypatch.setattr(gemv_module, name, lambda *a, _real=real: fused_calls.append(1) or _real(*a))
    g = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 1), (1, 5), (3, 1)):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)
        pos = torch.arange(seq, device=device).expand(batch, seq) + 3
        fused_calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(gm(input_ids=ids, position_ids=pos), ref(input_ids=ids, position_ids=pos),
                                       atol=1e-4, rtol=1e-4)
        # One row (batch-1 decode) takes the fused kernels; more rows run the unfused kernels.
        assert len(fused_calls) == (fused + LAYERS if batch * seq == 1 else 0)


def test_each_fusion_can_be_switched_off(gemv_graph):
    ref = gemv_graph
    only_swiglu = _prologue(ref, add_rmsnorm=False)
    assert count_op(only_swiglu, NORM_GEMV) == 0 and count_op(only_swiglu, SWIGLU_GEMV) == LAYERS
    only_norm = _prologue(ref, swiglu=False)
    assert count_op(only_norm, NORM_GEMV) == 2 * LAYERS - 1 and count_op(only_norm, SWIGLU_GEMV) == 0


def test_a_norm_read_by_two_ops_stays_unfused(gemv_graph):
    ref = copy.deepcopy(gemv_graph)  # edited below
    norm = next(n for n in ref.graph.nodes if n.target is ADD_RMSNORM)
    normed = next(u for u in norm.users if u.args[1] == 0)
    with ref.graph.inserting_after(normed):
        extra = ref.graph.call_function(torch.ops.aten.neg.default, (normed,))
    out = next(n for n in ref.graph.nodes if n.op == "output")
    out.args = ((out.args[0], extra),)  # a second reader of the normalised row
    ref.recompile()
    gm = _prologue(ref)
    assert count_op(gm, NORM_GEMV) == 2 * LAYERS - 2 and count_op(gm, ADD_RMSNORM) == 2


def test_graphs_without_gemvs_are_left_alone():
    gm = export_with_attention_ops(tiny_llama())
    before = str(gm.graph)
    assert str(_prologue(gm).graph) == before

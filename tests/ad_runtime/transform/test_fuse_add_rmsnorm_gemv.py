"""fuse_add_rmsnorm_gemv: an add_rmsnorm whose norm feeds only a GEMV op becomes one op (same answers); others stay."""

import copy
from types import SimpleNamespace

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from tiny_llama import calls_by_rows, export_with_attention_ops, tiny_llama

ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm.default
FUSED = torch.ops.auto_deploy.triton_add_rmsnorm_gemv.default
GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu.default


def _interpreted() -> str:
    try:
        use_interpreter_without_gpu()  # the rewritten graph runs here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def exported():
    """One export of the tiny Llama (CPU, or the GPU where there is one), copied by each graph built from it."""
    return export_with_attention_ops(tiny_llama(device="cuda" if torch.cuda.is_available() else "cpu"))


def _gemv_graph(gm, fuse: bool, norm_backend: str = "triton", gemv: bool = True):
    gm = copy.deepcopy(gm)
    conf = {"match_rmsnorm_pattern": {}, "fuse_gemms": {}, "fuse_add_rmsnorm": {"backend": norm_backend}}
    if gemv:
        conf.update({"gemv_decode_linear": {}, "fuse_gemv_swiglu": {}})
    if fuse:
        conf["fuse_add_rmsnorm_gemv"] = {}
    opt = InferenceOptimizer(None, conf)
    return opt(cm=SimpleNamespace(device="cuda"), mod=gm), opt.history


def test_each_norm_read_by_one_gemv_fuses_and_answers_as_before(exported, monkeypatch):
    device = _interpreted()
    ref, _ = _gemv_graph(exported, fuse=False)
    gm, _ = _gemv_graph(exported, fuse=True)
    # Two layers: layer 0's MLP norm, layer 1's attention and MLP norms fuse, two of them into a gate/up GEMV
    # (layer 0's first norm has no residual add; the final norm reaches the LM head through a slice and stays).
    assert count_op(ref, ADD_RMSNORM) == 4 and count_op(gm, ADD_RMSNORM) == 1 and count_op(gm, FUSED) == 3
    assert sum(n.args[6] for n in gm.graph.nodes if n.target is FUSED) == 2
    assert count_op(gm, GEMV_SWIGLU) == 0 and count_op(gm, GEMV) == count_op(ref, GEMV) - 1
    calls = []
    real = gemv_module.add_rmsnorm_gemv
    monkeypatch.setattr(gemv_module, "add_rmsnorm_gemv", lambda *a: calls.append(1) or real(*a))
    # Only one-row calls (batch-1 decode) take the fused launch; more rows run the norm kernel and the linear.
    assert calls_by_rows(gm, ref, device, calls) == {1: 3, 5: 0, 3: 0}


def test_a_norm_read_by_something_else_too_stays(exported):
    _interpreted()
    gm, _ = _gemv_graph(exported, fuse=False)
    norm = next(n for n in gm.graph.nodes if n.target is ADD_RMSNORM)
    normed = next(u for u in norm.users if u.args[1] == 0)
    with gm.graph.inserting_after(normed):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (normed,))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0], extra) if not isinstance(out_node.args[0], tuple)
                     else (*out_node.args[0], extra),)
    gm.recompile()
    out = InferenceOptimizer(None, {"fuse_add_rmsnorm_gemv": {}})(cm=SimpleNamespace(device="cuda"), mod=gm)
    assert count_op(out, FUSED) == 2 and count_op(out, ADD_RMSNORM) == 2


@pytest.mark.parametrize("norm_backend, gemv, reason", [
    ("triton", False, "gemv_decode_linear did not run"),
    ("torch", True, "fuse_add_rmsnorm's backend is not triton"),
])
def test_without_its_inputs_the_transform_skips_and_says_why(exported, norm_backend, gemv, reason):
    _interpreted()
    gm, history = _gemv_graph(exported, fuse=True, norm_backend=norm_backend, gemv=gemv)
    assert count_op(gm, FUSED) == 0 and history["fuse_add_rmsnorm_gemv"].skipped
    assert reason in history["fuse_add_rmsnorm_gemv"].reason

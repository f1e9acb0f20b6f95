"""fuse_gemv_swiglu: the merged gate/up GEMV and its silu(gate) * up become one op (same answers); others stay."""

import copy
from types import SimpleNamespace

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from tiny_llama import calls_by_rows, export_with_attention_ops, tiny_llama

GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu.default
SILU = torch.ops.aten.silu.default


def _fused_gemv_graph(model, fuse: bool):
    gm = export_with_attention_ops(model)
    conf = {"fuse_gemms": {}, "gemv_decode_linear": {}}
    if fuse:
        conf["fuse_gemv_swiglu"] = {}
    return InferenceOptimizer(None, conf)(cm=SimpleNamespace(device="cuda"), mod=gm)


def test_without_gemv_ops_the_transform_skips():
    gm = export_with_attention_ops(tiny_llama())
    opt = InferenceOptimizer(None, {"fuse_gemv_swiglu": {}})
    out = opt(cm=SimpleNamespace(device="cpu"), mod=gm)
    assert count_op(out, GEMV_SWIGLU) == 0 and count_op(out, SILU) == 2
    assert opt.history["fuse_gemv_swiglu"].skipped


def test_each_mlp_fuses_and_answers_as_before(monkeypatch):
    try:
        use_interpreter_without_gpu()  # the rewritten graph runs here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(device=device)
    ref = _fused_gemv_graph(copy.deepcopy(model), fuse=False)
    gm = _fused_gemv_graph(model, fuse=True)
    # Two layers: each MLP's gate/up GEMV and activation are one op; q/k/v, o, down and the LM head stay GEMVs.
    assert count_op(gm, GEMV_SWIGLU) == 2 and count_op(gm, SILU) == 0
    assert count_op(gm, GEMV) == count_op(ref, GEMV) - 2
    calls = []
    real = gemv_module.gemv_swiglu
    monkeypatch.setattr(gemv_module, "gemv_swiglu", lambda *a: calls.append(1) or real(*a))
    # Only one-row calls (batch-1 decode) take the fused GEMV; more rows run linear + one activation pass.
    assert calls_by_rows(gm, ref, device, calls) == {1: 2, 5: 0, 3: 0}


def test_a_gate_used_elsewhere_is_left_alone():
    gm = _fused_gemv_graph(tiny_llama(), fuse=False)
    silu = next(n for n in gm.graph.nodes if n.target is SILU)
    gate = silu.args[0]
    with gm.graph.inserting_after(silu):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (gate,))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0], extra) if not isinstance(out_node.args[0], tuple)
                     else (*out_node.args[0], extra),)
    gm.recompile()
    out = InferenceOptimizer(None, {"fuse_gemv_swiglu": {}})(cm=SimpleNamespace(device="cuda"), mod=gm)
    assert count_op(out, GEMV_SWIGLU) == 1 and count_op(out, SILU) == 1


class _MergedMlp(torch.nn.Module):
    """An MLP whose model merges gate and up itself and cuts them with chunk or split (Phi-3 style), up first in
    the product."""

    def __init__(self, cut: str):
        super().__init__()
        self.gate_up, self.down, self.cut = torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(24, 16), cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        gate, up = gu.chunk(2, dim=-1) if self.cut == "chunk" else gu.split(24, dim=-1)
        return self.down(up * torch.nn.functional.silu(gate))


@pytest.mark.parametrize("cut", ["chunk", "split"])
def test_a_model_merged_gate_up_cut_by_chunk_or_split_fuses(cut):
    try:
        use_interpreter_without_gpu()
    except RuntimeError as e:
        pytest.skip(str(e))
    from torch.export import Dim
    from ad_compiler.export.export import torch_export_to_gm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = _MergedMlp(cut).to(device).eval()
    x = torch.randn(1, 3, 16, device=device)
    gm = torch_export_to_gm(model, args=(x,), dynamic_shapes=({1: Dim.DYNAMIC},))
    gm = InferenceOptimizer(None, {"gemv_decode_linear": {}, "fuse_gemv_swiglu": {}})(
        cm=SimpleNamespace(device="cuda"), mod=gm)
    assert count_op(gm, GEMV_SWIGLU) == 1 and count_op(gm, SILU) == 0
    with torch.no_grad():
        for rows in (1, 4):
            xr = torch.randn(1, rows, 16, device=device)
            torch.testing.assert_close(gm(xr), model(xr), atol=1e-5, rtol=1e-5)

"""gemv_decode_linear: on a GPU every linear becomes triton_gemv_linear (same answers); on a CPU nothing changes."""

import copy
from types import SimpleNamespace

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from tiny_llama import calls_by_rows, export_with_attention_ops, tiny_llama

LINEAR = torch.ops.aten.linear.default
GEMV_LINEAR = torch.ops.auto_deploy.triton_gemv_linear.default


def _apply(gm, device: str):
    return InferenceOptimizer(None, {"gemv_decode_linear": {}})(cm=SimpleNamespace(device=device), mod=gm)


def test_cpu_graphs_keep_aten_linear():
    gm = export_with_attention_ops(tiny_llama())
    before = count_op(gm, LINEAR)
    out = _apply(gm, "cpu")
    assert before > 0 and count_op(out, LINEAR) == before and count_op(out, GEMV_LINEAR) == 0


def test_gpu_graph_answers_as_before_with_one_row_through_the_gemv(monkeypatch):
    try:
        use_interpreter_without_gpu()  # the rewritten graph runs here: on a CPU in Triton's interpreter
    except RuntimeError as e:
        pytest.skip(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(device=device)
    ref = export_with_attention_ops(model)
    gm = _apply(copy.deepcopy(ref), "cuda")
    linears = count_op(ref, LINEAR)
    assert count_op(gm, LINEAR) == 0 and count_op(gm, GEMV_LINEAR) == linears  # the LM head too
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a: calls.append(1) or real(*a))
    # Only the one-row call (batch-1 decode) takes the GEMV; more rows stay on aten.linear.
    assert calls_by_rows(gm, ref, device, calls) == {1: linears, 5: 0, 3: 0}

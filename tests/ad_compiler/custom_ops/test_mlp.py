"""torch_swiglu_mlp against transformers' LlamaMLP, and export as one node."""

import torch
from conftest import count_calls, export_fn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

swiglu = torch.ops.auto_deploy.torch_swiglu_mlp


def test_matches_llama_mlp():
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=48, hidden_act="silu"))
    x = torch.randn(2, 5, 32)
    out = swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    torch.testing.assert_close(out, mlp(x))


def test_export_one_node_dynamic():
    g, u, d = torch.randn(48, 32), torch.randn(48, 32), torch.randn(32, 48)
    dyn = torch.export.Dim.DYNAMIC
    ep = export_fn(lambda x: swiglu(x, g, u, d), (torch.randn(2, 5, 32),), ({0: dyn, 1: dyn},))
    assert count_calls(ep, swiglu) == 1
    x = torch.randn(4, 3, 32)
    torch.testing.assert_close(ep.module()(x), swiglu(x, g, u, d))

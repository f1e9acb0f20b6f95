"""fuse_moe: torch_moe becomes torch_moe_fused on pre-transposed weights, outputs equal, old weights gone."""

import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op, run_shape_prop
from torch.fx import GraphModule

ad = torch.ops.auto_deploy
D = torch.export.Dim.DYNAMIC


class TwoMoe(torch.nn.Module):
    """Two routed-experts layers written with the canonical op, as match_moe_pattern leaves them."""

    def __init__(self, h: int = 32, i: int = 24, e: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.routers = torch.nn.ModuleList(torch.nn.Linear(h, e, bias=False) for _ in range(2))
        self.gate_up = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(e, 2 * i, h) / h**0.5) for _ in range(2))
        self.down = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(e, h, i) / i**0.5) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in range(2):
            w, idx = torch.topk(torch.softmax(self.routers[layer](x), -1), self.k)
            x = x + ad.torch_moe(x, idx, w, self.gate_up[layer], self.down[layer], "silu")
        return x


def _run(gm: GraphModule) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("fuse_moe")()(gm, None, None, SharedConfig())
    return gm, gm._transform_history["fuse_moe"].num_matches


def test_torch_moe_becomes_fused():
    torch.manual_seed(0)
    model = TwoMoe().eval()
    gm = torch_export_to_gm(model, (torch.randn(7, 32),), dynamic_shapes=({0: D},))
    x = torch.randn(19, 32)
    before = gm(x)
    assert count_op(gm, ad.torch_moe) == 2

    gm, matches = _run(gm)

    assert matches == 2
    run_shape_prop(gm)  # the rewritten graph still propagates fake (symbolic) shapes
    assert count_op(gm, ad.torch_moe) == 0
    assert count_op(gm, ad.torch_moe_fused) == 2
    keys = set(gm.state_dict())
    assert "gate_up.0" not in keys and "down.1" not in keys
    assert gm.state_dict()["gate_up.0_t"].shape == (4, 32, 48)
    assert gm.state_dict()["down.1_t"].shape == (4, 24, 32)
    torch.testing.assert_close(gm(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_no_moe_no_change():
    gm = torch_export_to_gm(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    keys = set(gm.state_dict())
    gm, matches = _run(gm)
    assert matches == 0 and set(gm.state_dict()) == keys

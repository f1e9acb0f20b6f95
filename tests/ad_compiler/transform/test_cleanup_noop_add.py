"""cleanup_noop_add: x + zeros of x's shape disappears; broadcasting adds of zeros stay."""

import torch
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


class Adds(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + torch.zeros_like(x)  # no-op
        y = y * 3 + 0  # no-op (scalar zero)
        z = y + torch.zeros(2, 1, 8)  # broadcasts [b, 8] to [2, b, 8]: not a no-op
        return z + 1.0  # a real add


def test_removes_only_shape_preserving_zero_adds(export_module, apply_transform):
    x = torch.randn(3, 8)
    gm = export_module(Adds(), x)
    before = count_op(gm, aten.add.Tensor)
    expected = gm(x)
    gm, info = apply_transform("cleanup_noop_add", gm)
    assert info.num_matches == 2
    assert count_op(gm, aten.add.Tensor) == before - 2
    assert count_op(gm, aten.zeros_like.default) == 0  # dead after the rewrite
    out = gm(x)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, expected)

"""cleanup_noop_slice: whole-range slices disappear, real slices stay, outputs unchanged."""

import torch
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


class Slicy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x[:, 0:] and x[:, :8] (8 == static width) take everything; x[:, :2] does not.
        return x[:, 0:] * 2 + x[:, :8] + x[:, :2].sum(-1, keepdim=True)


def test_removes_only_whole_range_slices(export_module, apply_transform):
    x = torch.randn(3, 8)
    gm = export_module(Slicy(), x)
    before = count_op(gm, aten.slice.Tensor)
    expected = gm(x)
    gm, info = apply_transform("cleanup_noop_slice", gm)
    assert before >= 3
    assert count_op(gm, aten.slice.Tensor) == 1  # only x[:, :2]
    assert info.num_matches == before - 1
    torch.testing.assert_close(gm(x), expected)
    torch.testing.assert_close(gm(torch.randn(5, 8)).shape, torch.Size([5, 8]))

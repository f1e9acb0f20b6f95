"""cleanup_noop_to: x.to(x.dtype) disappears; casts that change the dtype, or copy, stay."""

import torch
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


class Casts(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = (x * 2).to(x.dtype)  # no-op: as Olmo2's RoPE casts back to the query's dtype
        half = y.to(torch.float16)  # a real cast
        copied = (y + 1).to(torch.float32, copy=True)  # a copy is asked for: kept
        return y.sin(), half, copied


def test_removes_only_casts_to_the_same_dtype(export_module, apply_transform):
    x = torch.randn(3, 8)
    gm = export_module(Casts(), x)
    before = count_op(gm, aten.to.dtype)
    assert before >= 2, gm.graph  # export keeps the no-op cast and the real one as aten.to.dtype
    expected = gm(x)
    gm, info = apply_transform("cleanup_noop_to", gm)
    assert info.num_matches == 1
    assert count_op(gm, aten.to.dtype) == before - 1
    sin = next(n for n in gm.graph.nodes if n.target is aten.sin.default)
    assert sin.args[0].target is aten.mul.Tensor  # reads the product directly
    for out, ref in zip(gm(x), expected, strict=True):
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref)

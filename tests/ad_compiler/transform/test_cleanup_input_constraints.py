"""cleanup_input_constraints: export's guard module and asserts go; other shapes then run."""

import torch
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten
ASSERTS = [aten._assert_scalar, aten._assert_async, aten.sym_constrain_range, aten.sym_constrain_range_for_size,
           aten._assert_tensor_metadata]


class NeedsEvenBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._check(x.shape[0] >= 2)  # becomes a guard / _assert_scalar in the exported graph
        return x.sin() * 2


def _guards(gm: torch.fx.GraphModule) -> int:
    """The guard module call plus ep.module()'s input-range forward pre-hook."""
    hooks = sum(1 for h in gm._forward_pre_hooks.values() if h.__name__ == "_check_input_constraints_pre_hook")
    return hooks + sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn")


def test_guards_and_asserts_removed(export_module, apply_transform):
    x = torch.randn(4, 3)
    gm = export_module(NeedsEvenBatch(), x)
    before = _guards(gm) + count_op(gm, ASSERTS)
    assert before >= 1
    expected = gm(x)
    gm, info = apply_transform("cleanup_input_constraints", gm)
    assert info.num_matches == before
    assert _guards(gm) == 0 and not hasattr(gm, "_guards_fn")
    assert count_op(gm, ASSERTS) == 0
    torch.testing.assert_close(gm(x), expected)
    # The guard would have refused a batch of 1; the runtime's decode steps need it.
    torch.testing.assert_close(gm(x[:1]), x[:1].sin() * 2)

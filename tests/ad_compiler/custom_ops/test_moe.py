"""torch_moe / torch_moe_fused against transformers' MixtralSparseMoeBlock, and export as one node."""

import pytest
import torch
from conftest import count_calls, export_fn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

ops = torch.ops.auto_deploy


def _mixtral_block(impl: str = "eager") -> MixtralSparseMoeBlock:
    cfg = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


def _route(block: MixtralSparseMoeBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, weights, experts = block.gate(x)
    return experts, weights


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_matches_mixtral_block(impl):
    block = _mixtral_block(impl)
    x = torch.randn(3, 5, 32)
    flat = x.view(-1, 32)
    experts, weights = _route(block, flat)
    out = ops.torch_moe(flat, experts, weights, block.experts.gate_up_proj, block.experts.down_proj)
    torch.testing.assert_close(out.view_as(x), block(x), atol=1e-5, rtol=1e-5)


def test_fused_matches_reference():
    block = _mixtral_block()
    flat = torch.randn(40, 32)
    experts, weights = _route(block, flat)
    gu, dn = block.experts.gate_up_proj, block.experts.down_proj
    ref = ops.torch_moe(flat, experts, weights, gu, dn)
    gu_t, dn_t = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    fused = ops.torch_moe_fused(flat, experts, weights, gu_t, dn_t)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)


def test_experts_without_tokens_and_out_of_range_ids_are_skipped():
    gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    x = torch.randn(3, 6)
    # Expert 4 does not exist here (another rank's): its slot contributes nothing.
    sel = torch.tensor([[0, 4], [0, 0], [2, 4]])
    w = torch.rand(3, 2)
    expected = torch.zeros(3, 6)
    for t in range(3):
        for j in range(2):
            e = int(sel[t, j])
            if e < 4:
                g, u = (gu[e] @ x[t]).chunk(2)
                expected[t] += w[t, j] * (dn[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(ops.torch_moe(x, sel, w, gu, dn), expected)
    torch.testing.assert_close(ops.torch_moe_fused(x, sel, w, gu.transpose(1, 2), dn.transpose(1, 2)), expected)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="act_fn"):
        ops.torch_moe(torch.randn(2, 6), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                      torch.randn(1, 8, 6), torch.randn(1, 6, 4), "tanhh")


@pytest.mark.parametrize("op_name", ["torch_moe", "torch_moe_fused"])
def test_export_one_node_dynamic_tokens(op_name):
    op = getattr(ops, op_name)
    gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    if op_name == "torch_moe_fused":
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    dyn = torch.export.Dim.DYNAMIC
    x, sel, w = torch.randn(5, 6), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    ep = export_fn(lambda x, s, w: op(x, s, w, gu, dn), (x, sel, w), ({0: dyn}, {0: dyn}, {0: dyn}))
    assert count_calls(ep, op) == 1
    x, sel, w = torch.randn(9, 6), torch.randint(0, 4, (9, 2)), torch.rand(9, 2)
    torch.testing.assert_close(ep.module()(x, sel, w), op(x, sel, w, gu, dn))


def test_fused_op_inside_a_graph_capture_needs_no_host_sync(monkeypatch):
    """While a CUDA graph captures (simulated here), torch_moe_fused and torch_moe read nothing on the host: the
    expert sort has fixed shapes and, where grouped_mm would sync, every expert runs over every row and each row
    keeps its own."""
    from ad_compiler.custom_ops import moe

    monkeypatch.setattr(moe, "_capturing", lambda t: True)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host sync while capturing"))
    for reader in ("item", "__int__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, reader, lambda self: pytest.fail("host sync while capturing"))
    gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    x = torch.randn(5, 6)
    sel = torch.tensor([[0, 4], [0, 0], [2, -1], [3, 1], [1, 2]])  # 4 and -1: another rank's experts
    w = torch.rand(5, 2)
    got = ops.torch_moe_fused(x, sel, w, gu.transpose(1, 2), dn.transpose(1, 2))
    got_reference_op = ops.torch_moe(x, sel, w, gu, dn)  # its host loop is left for the grouped maths
    monkeypatch.undo()
    expected = ops.torch_moe(x, sel, w, gu, dn)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_reference_op, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_op_captured_in_a_cuda_graph_matches_eager(dtype):
    # bf16 on an H100/H200 takes grouped_mm's device-side path; float16 and float32, whose grouped_mm would sync,
    # take the dense per-token products while capturing and the per-expert ones eagerly.
    g = torch.Generator().manual_seed(0)
    gu, dn = (torch.randn(*s, generator=g).to("cuda", dtype) for s in ((8, 64, 32), (8, 32, 32)))
    x = torch.randn(6, 32, generator=g).to("cuda", dtype)
    sel = torch.randint(-1, 9, (6, 2), generator=g).cuda()  # -1 and 8: another rank's experts
    w = torch.rand(6, 2, generator=g).to("cuda", dtype)
    args = (x, sel, w, gu.transpose(1, 2), dn.transpose(1, 2))
    eager = ops.torch_moe_fused(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.torch_moe_fused(*args)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.torch_moe_fused(*args)
    graph.replay()
    torch.testing.assert_close(out, eager, atol=1e-4 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_a_capture_too_large_for_the_dense_path_fails_clearly(monkeypatch):
    # 5 tokens x 4 experts over a limit of 16 products: the capture fails (a piecewise prefill piece then runs
    # eagerly) instead of computing every expert for every token.
    from ad_compiler.custom_ops import moe

    monkeypatch.setattr(moe, "_capturing", lambda t: True)
    monkeypatch.setattr(moe, "DENSE_CAPTURE_MAX_PRODUCTS", 16)
    gu, dn = torch.randn(4, 8, 6), torch.randn(4, 6, 4)
    with pytest.raises(RuntimeError, match="5 tokens x 4 experts"):
        ops.torch_moe_fused(torch.randn(5, 6), torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2),
                            gu.transpose(1, 2), dn.transpose(1, 2))

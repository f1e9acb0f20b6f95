"""fuse_add_rmsnorm: each residual add + the RMSNorm reading it becomes one op with both outputs, equal logits."""

import operator

import pytest
import torch
from ad_compiler.errors import MissingBackendError
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.kernels_registry import _BACKENDS
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op, is_op
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
LAYERS = 2
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
             intermediate_size=128, head_dim=16)
D = torch.export.Dim.DYNAMIC
NORMS = (ad.torch_rmsnorm, ad.torch_rmsnorm_fused)


def run(name: str, gm: GraphModule, **config) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get(name)(config)(gm, None, None, SharedConfig())
    return gm, gm._transform_history[name].num_matches


def llama(dtype: torch.dtype, fuse_norms: bool, device: str = "cpu") -> tuple[GraphModule, dict[str, torch.Tensor]]:
    """A tiny random Llama with canonical norms, optionally already retargeted by fuse_rmsnorm (torch)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).eval().to(device, dtype)
    inputs = dict(input_ids=torch.randint(0, 128, (2, 7)), position_ids=torch.arange(7).expand(2, 7))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    gm = torch_export_to_gm(Logits(model), (), inputs, dynamic_shapes={k: {0: D, 1: D} for k in inputs})
    gm, _ = run("match_rmsnorm_pattern", gm)
    if fuse_norms:
        gm, _ = run("fuse_rmsnorm", gm, backend="torch")
    return gm, inputs


def add_feeds_norm(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if is_op(n, NORMS) and is_op(n.args[0], aten.add.Tensor))


@pytest.mark.parametrize("fuse_norms", [True, False], ids=["after-fuse_rmsnorm", "canonical-norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama_pairs_fused_logits_equal(dtype: torch.dtype, fuse_norms: bool) -> None:
    gm, inputs = llama(dtype, fuse_norms)
    ref = gm(**inputs)
    # Per layer: the attention norm reads the previous layer's residual add (except layer 0's, which reads the
    # embedding) and the MLP norm reads the attention residual add; the final norm reads the last add.
    expected = 2 * LAYERS - 1 + 1
    assert add_feeds_norm(gm) == expected
    gm, n = run("fuse_add_rmsnorm", gm, backend="torch")
    assert n == expected
    assert count_op(gm, ad.torch_fused_add_rmsnorm) == expected
    assert add_feeds_norm(gm) == 0
    assert count_op(gm, NORMS) == 1  # layer 0's input norm
    for node in gm.graph.find_nodes(op="call_function", target=ad.torch_fused_add_rmsnorm.default):
        norm_val, sum_val = node.meta["val"]
        assert norm_val.shape == sum_val.shape and sum_val.dtype == dtype
        for user in node.users:  # each getitem knows its shape for later transforms (e.g. the LM-head gather)
            assert user.target is operator.getitem and user.meta["val"] is node.meta["val"][user.args[1]]
    out = gm(**inputs)
    assert out.dtype == ref.dtype
    if fuse_norms:  # the same norm kernel on the same sums: bit-equal
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:  # torch_rmsnorm became aten's rms_norm kernel, whose reduction order may differ (as in fuse_rmsnorm)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(out, ref, **tol)


class NotPairs(torch.nn.Module):
    """One fusable pair and three look-alikes: an add with alpha, an add read only by a matmul, a broadcast add."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x + r
        good = ad.torch_rmsnorm(h, self.w, 1e-6)
        scaled = ad.torch_rmsnorm(torch.add(x, r, alpha=2.0), self.w, 1e-6)
        other = (x + 2 * r) @ torch.ones(16, 4)
        broadcast = ad.torch_rmsnorm(x + self.bias, self.w, 1e-6)
        return h, good, scaled, other, broadcast


def test_only_plain_adds_feeding_a_norm_match() -> None:
    torch.manual_seed(0)
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gm = torch_export_to_gm(NotPairs(), (x, r), dynamic_shapes=({0: D, 1: D}, {0: D, 1: D}))
    ref = gm(x, r)
    adds = count_op(gm, aten.add.Tensor)
    gm, n = run("fuse_add_rmsnorm", gm, backend="torch")
    assert n == 1
    assert count_op(gm, ad.torch_fused_add_rmsnorm) == 1
    assert count_op(gm, aten.add.Tensor) == adds - 1 and count_op(gm, ad.torch_rmsnorm) == 2
    for a, b in zip(gm(x, r), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unregistered_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(_BACKENDS["add_rmsnorm"].entries, "triton", raising=False)
    gm, _ = llama(torch.float32, fuse_norms=True)
    with pytest.raises(MissingBackendError, match="ad-runtime"):
        run("fuse_add_rmsnorm", gm, backend="triton")


def test_registered_backend_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand in for ad_runtime's triton kernel: any op with the add_rmsnorm signature.
    stand_in = ad.torch_fused_add_rmsnorm.default
    monkeypatch.setitem(_BACKENDS["add_rmsnorm"].entries, "triton", stand_in)
    monkeypatch.setitem(_BACKENDS["add_rmsnorm"].entries, "torch", None)  # must not be the one looked up
    gm, inputs = llama(torch.float32, fuse_norms=True)
    ref = gm(**inputs)
    gm, n = run("fuse_add_rmsnorm", gm, backend="triton")
    assert n == 2 * LAYERS and count_op(gm, stand_in) == n
    torch.testing.assert_close(gm(**inputs), ref, rtol=0, atol=0)


def test_graph_without_pairs_needs_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(_BACKENDS["add_rmsnorm"].entries, "triton", raising=False)  # not installed: never asked for
    gm = torch_export_to_gm(torch.nn.ReLU(), (torch.randn(3),))
    _, n = run("fuse_add_rmsnorm", gm, backend="triton")
    assert n == 0


@pytest.mark.gpu
def test_triton_backend_bf16_on_gpu_matches_unfused() -> None:
    import ad_runtime  # noqa: F401 - registers the triton kernels

    gm, inputs = llama(torch.bfloat16, fuse_norms=True, device="cuda")
    ref = gm(**inputs)
    gm, n = run("fuse_add_rmsnorm", gm, backend="triton")
    assert n == 2 * LAYERS and count_op(gm, ad.triton_fused_add_rmsnorm) == n
    # The torch reference norm runs aten's kernel, the triton one its own reduction: bf16 rounding apart.
    torch.testing.assert_close(gm(**inputs), ref, rtol=2e-2, atol=2e-2)

"""fuse_rmsnorm: torch_rmsnorm nodes become the configured backend's kernel with equal outputs."""

import pytest
import torch
from ad_compiler.errors import MissingBackendError
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.kernels_registry import _BACKENDS
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op
from torch.fx import GraphModule

ad = torch.ops.auto_deploy
D = torch.export.Dim.DYNAMIC


class TwoNorms(torch.nn.Module):
    """Already-canonical norms (what match_rmsnorm_pattern leaves), plus a residual add between them."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(32, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.randn(32, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ad.torch_rmsnorm(x, self.w1, 1e-6)
        return ad.torch_rmsnorm(x + h, self.w2, 1e-5)


def exported(dtype: torch.dtype) -> tuple[GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, dtype=dtype)
    return torch_export_to_gm(TwoNorms(dtype), (x,), dynamic_shapes=({0: D, 1: D},)), x


def fuse(gm: GraphModule, **config) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("fuse_rmsnorm")(config)(gm, None, None, SharedConfig())
    return gm, gm._transform_history["fuse_rmsnorm"].num_matches


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend(backend: str, dtype: torch.dtype) -> None:
    gm, x = exported(dtype)
    ref = gm(x)
    assert count_op(gm, ad.torch_rmsnorm) == 2
    gm, n = fuse(gm, backend=backend)
    assert n == 2
    assert count_op(gm, ad.torch_rmsnorm) == 0
    assert count_op(gm, ad.torch_rmsnorm_fused) == 2
    out = gm(x)
    assert out.dtype == dtype
    # Same math; only the reduction order inside the aten kernel may differ.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(out, ref, **tol)


def test_unregistered_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(_BACKENDS["rmsnorm"].entries, "triton", raising=False)
    gm, _ = exported(torch.float32)
    with pytest.raises(MissingBackendError, match="ad-runtime"):
        fuse(gm, backend="triton")


def test_registered_backend_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand in for ad_runtime's triton kernel: any op with the rmsnorm signature.
    monkeypatch.setitem(_BACKENDS["rmsnorm"].entries, "triton", ad.torch_rmsnorm.default)
    gm, x = exported(torch.float32)
    ref = gm(x)
    gm, n = fuse(gm, backend="triton")
    assert n == 2 and count_op(gm, ad.torch_rmsnorm_fused) == 0 and count_op(gm, ad.torch_rmsnorm) == 2
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)


def test_graph_without_norms_needs_no_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(_BACKENDS["rmsnorm"].entries, "triton", raising=False)  # not installed: never asked for
    gm = torch_export_to_gm(torch.nn.ReLU(), (torch.randn(3),))
    _, n = fuse(gm, backend="triton")
    assert n == 0

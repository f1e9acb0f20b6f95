"""kernels_registry: lookups by (kernel, backend), 'auto' resolution, and the missing-backend error."""

import pytest
import torch
from ad_compiler import kernels_registry as kr
from ad_compiler.errors import MissingBackendError


def test_torch_backends_registered_by_the_compiler() -> None:
    assert kr.get_kernel("rmsnorm", "torch") is torch.ops.auto_deploy.torch_rmsnorm_fused.default
    assert kr.get_kernel("add_rmsnorm", "torch") is torch.ops.auto_deploy.torch_fused_add_rmsnorm.default
    assert kr.get_kernel("rope", "torch") is torch.ops.auto_deploy.torch_rope_with_cos_sin_cache.default


def test_auto_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = torch.ops.auto_deploy.torch_rmsnorm.default
    monkeypatch.setitem(kr._BACKENDS["rmsnorm"].entries, "triton", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kr.resolve_backend("rmsnorm") == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kr.get_kernel("rmsnorm", "auto") is fake
    monkeypatch.delitem(kr._BACKENDS["rmsnorm"].entries, "triton")
    assert kr.resolve_backend("rmsnorm") == "torch"  # GPU but no triton registered


def test_missing_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(kr._BACKENDS["rope"].entries, "flashinfer", raising=False)
    with pytest.raises(MissingBackendError, match=r"install ad-runtime and `import ad_runtime`"):
        kr.get_kernel("rope", "flashinfer")


def test_registration_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kr._BACKENDS["rmsnorm"], "entries", dict(kr._BACKENDS["rmsnorm"].entries))
    with pytest.raises(ValueError, match="unknown kernel"):
        kr.register_kernel("softmax", "torch", abs)
    with pytest.raises(ValueError, match="auto"):
        kr.register_kernel("rmsnorm", "auto", abs)
    with pytest.raises(ValueError, match="already has"):
        kr.register_kernel("rmsnorm", "torch", abs)
    kr.register_kernel("rmsnorm", "torch", abs, replace=True)
    assert kr.get_kernel("rmsnorm", "torch") is abs
    assert "torch" in kr.available_backends("rmsnorm")

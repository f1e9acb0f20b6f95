"""auto_deploy::triton_rope_with_cos_sin_cache against the canonical torch_rope_with_cos_sin_cache."""

import ad_compiler.custom_ops  # noqa: F401 - registers torch_rope_with_cos_sin_cache
import ad_runtime.kernels  # noqa: F401 - registers triton_rope_* and the "triton" kernel backends
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)  # HF layout [b, s, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cos_sin_cache_with_position_ids(unsqueeze_dim, dtype, atol):
    g = torch.Generator().manual_seed(1)
    b, s, n, n_kv, d, max_pos = 2, 6, 4, 1, 32, 64
    pos = torch.randint(0, max_pos, (b, s), generator=g).to(DEVICE)
    all_cos, all_sin = _cos_sin(torch.arange(max_pos, device=DEVICE), d, torch.float32)
    cache = torch.cat([all_cos[:, : d // 2], all_sin[:, : d // 2]], dim=-1).to(dtype)  # [max_pos, d] = [cos | sin]
    qs, ks = ((b, n, s, d), (b, n_kv, s, d)) if unsqueeze_dim == 1 else ((b, s, n, d), (b, s, n_kv, d))
    q = torch.randn(*qs, generator=g).to(DEVICE, dtype)
    k = torch.randn(*ks, generator=g).to(DEVICE, dtype)
    out = torch.ops.auto_deploy.triton_rope_with_cos_sin_cache(q, k, pos, cache, unsqueeze_dim)
    ref = torch.ops.auto_deploy.torch_rope_with_cos_sin_cache(q, k, pos, cache, unsqueeze_dim)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o, r, atol=atol, rtol=atol)


def test_registered_as_triton_kernel_backends():
    from ad_compiler.kernels_registry import get_kernel

    assert get_kernel("rope", "triton") is torch.ops.auto_deploy.triton_rope_with_cos_sin_cache.default
    assert get_kernel("rmsnorm", "triton") is torch.ops.auto_deploy.triton_rmsnorm.default


def test_fake_impls():
    with torch._subclasses.FakeTensorMode():
        q, k = torch.empty(1, 3, 4, 8), torch.empty(1, 3, 2, 8)
        oq, ok = torch.ops.auto_deploy.triton_rope_with_cos_sin_cache(q, k, torch.empty(1, 3, dtype=torch.long),
                                                                       torch.empty(16, 8), 2)
    assert oq.shape == q.shape and ok.shape == k.shape


@pytest.mark.gpu
def test_bf16_llama_shapes_on_gpu():
    b, s, n, n_kv, d = 2, 37, 32, 8, 128
    pos = torch.arange(s, device="cuda")[None].expand(b, -1)
    all_cos, all_sin = _cos_sin(torch.arange(64, device="cuda"), d, torch.float32)
    cache = torch.cat([all_cos[:, : d // 2], all_sin[:, : d // 2]], dim=-1).to(torch.bfloat16)
    q = torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, s, n_kv, d, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.auto_deploy.triton_rope_with_cos_sin_cache(q, k, pos, cache, 2)
    ref = torch.ops.auto_deploy.torch_rope_with_cos_sin_cache(q, k, pos, cache, 2)
    torch.testing.assert_close(out[0], ref[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[1], ref[1], atol=2e-2, rtol=2e-2)

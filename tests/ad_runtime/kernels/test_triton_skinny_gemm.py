"""The Triton skinny GEMM (2-64 rows) and the linear ops' dispatch to it, against aten.linear."""

import ad_runtime.kernels  # noqa: F401 - registers the ops
import pytest
import torch
from ad_runtime.kernels.triton import skinny_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LINEAR = torch.ops.auto_deploy.triton_gemv_linear
SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu
ADD_RMSNORM_GEMV = torch.ops.auto_deploy.triton_add_rmsnorm_gemv


def _data(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(m * 7 + n * 31 + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


def _ref(x, w, b, swiglu: bool) -> torch.Tensor:
    y = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype).float()
    if not swiglu:
        return y
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize(
    "m, n, k, dtype, bias",
    # rows below the 16-row tile (2, 5), between tiles (17), the most (64); N not a multiple of the output block
    # (70, 2 * 33); K not a multiple of the K step (300, 100).
    [(2, 70, 300, torch.bfloat16, True), (5, 66, 100, torch.float16, False), (17, 128, 256, torch.bfloat16, False),
     (64, 96, 128, torch.float16, True)],
)
def test_rows_match_linear(m, n, k, dtype, bias, swiglu):
    x, w, b = _data(m, n, k, dtype, bias)
    out = skinny_gemm.skinny_linear(x, w, b, swiglu=swiglu)
    assert out.shape == (m, n // 2 if swiglu else n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), _ref(x, w, b, swiglu), atol=3e-2, rtol=3e-2)


def test_inputs_that_are_unaligned_or_strided_slices():
    # The kernel is specialised on 16-byte aligned pointers: an input starting one element in (a slice of a fused
    # product) is copied first, and a row stride other than K is passed as it is.
    x, w, b = _data(6, 48, 64, torch.bfloat16, True)
    wide = torch.zeros(6, 80, dtype=x.dtype, device=x.device)
    for start in (1, 16):
        wide[:, start:start + 64] = x
        view = wide[:, start:start + 64]
        assert (view.data_ptr() % 16 == 0) == (start == 16) and view.stride(0) == 80
        out = skinny_gemm.skinny_linear(view, w, b)
        torch.testing.assert_close(out.float(), _ref(x, w, b, False), atol=3e-2, rtol=3e-2)


def test_linear_ops_take_it_for_few_rows_of_16_bit_dtypes(monkeypatch):
    calls = []
    real = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x, w, b = _data(6, 40, 32, torch.bfloat16, True)
    out = LINEAR(x.view(2, 3, 32), w, b)
    assert calls == [(2, 3, 32)] and out.shape == (2, 3, 40)
    torch.testing.assert_close(out.float(), _ref(x, w, b, False).view(2, 3, 40), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(SWIGLU(x, w, b).float(), _ref(x, w, b, True), atol=3e-2, rtol=3e-2)
    assert len(calls) == 2
    # The fused norm op's many-row path: the norm kernel, then the skinny GEMM.
    normed, summed = torch.ops.auto_deploy.triton_fused_add_rmsnorm(x, x, torch.ones(32, dtype=x.dtype), 1e-6)
    got, got_sum = ADD_RMSNORM_GEMV(x, x, torch.ones(32, dtype=x.dtype), 1e-6, w, b, False)
    assert len(calls) == 3 and torch.equal(got_sum, summed)
    torch.testing.assert_close(got.float(), _ref(normed, w, b, False), atol=3e-2, rtol=3e-2)
    # fp32 keeps cuBLAS's exact products; 65 rows are a prefill's and keep cuBLAS; so does the switch set to 0.
    x32, w32, b32 = _data(6, 40, 32, torch.float32, True)
    assert torch.equal(LINEAR(x32, w32, b32), torch.ops.aten.linear.default(x32, w32, b32))
    x65, _, _ = _data(65, 40, 32, torch.bfloat16, False)
    assert torch.equal(LINEAR(x65, w, None), torch.ops.aten.linear.default(x65, w, None))
    monkeypatch.setenv("AUTODEPLOY_SKINNY_GEMM", "0")
    assert torch.equal(LINEAR(x, w, b), torch.ops.aten.linear.default(x, w, b))
    assert len(calls) == 3


def test_above_16_rows_narrow_outputs_that_miss_whole_waves_keep_cublas(monkeypatch):
    # 132 SMs (an H200): 6144 features in 32-feature blocks are 192 programs, cuBLAS was faster there at 32 rows;
    # 4096 (one program per SM) and the merged gate/up or LM-head widths take the kernel.
    monkeypatch.setattr(skinny_gemm, "_num_sms", lambda device: 132)
    x16, x32 = torch.empty(16, 64, dtype=torch.bfloat16), torch.empty(32, 64, dtype=torch.bfloat16)
    w = {n: torch.empty(n, 64, dtype=torch.bfloat16) for n in (4096, 6144, 28672, 128256)}
    assert skinny_gemm.takes(x16, w[6144]) and not skinny_gemm.takes(x32, w[6144])
    assert skinny_gemm.takes(x32, w[4096]) and skinny_gemm.takes(x32, w[128256])
    assert skinny_gemm.takes(x32, w[28672], swiglu=True)
    assert not skinny_gemm.takes(torch.empty(1, 64, dtype=torch.bfloat16), w[4096])


def test_launch_tiles_fit_the_rows_and_widths():
    assert skinny_gemm.launch_config(4096, 4096, 5, False) == dict(
        BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    wide = skinny_gemm.launch_config(14336, 4096, 64, True)
    assert (wide["BLOCK_M"], wide["BLOCK_N"], wide["BLOCK_K"]) == (64, 64, 128)
    assert skinny_gemm.launch_config(576, 100, 17, False)["BLOCK_K"] == 128  # K below the step: one padded tile


def test_refuses_an_odd_merged_weight_and_too_many_rows():
    x, w, _ = _data(3, 7, 16, torch.bfloat16, False)
    with pytest.raises(ValueError, match="even rows, got 7"):
        skinny_gemm.skinny_linear(x, w, None, swiglu=True)
    with pytest.raises(ValueError, match="1..64 rows, got 65"):
        skinny_gemm.skinny_linear(torch.empty(65, 16, dtype=torch.bfloat16, device=DEVICE), w, None)


@pytest.mark.gpu
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("m", [2, 8, 32, 64])
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (960, 576)])
def test_llama_8b_and_smollm2_shapes_on_gpu(m, n, k, swiglu):
    if swiglu and n != 28672:
        pytest.skip("the merged gate/up weight only")
    x, w, _ = _data(m, n, k, torch.bfloat16, False)
    out = skinny_gemm.skinny_linear(x, w, None, swiglu=swiglu)
    torch.testing.assert_close(out.float(), _ref(x, w, None, swiglu), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k, swiglu", [(8, 4096, 4096, False), (32, 28672, 4096, True), (5, 70, 300, False)])
def test_the_dependents_trigger_changes_no_bit(m, n, k, swiglu):
    x, w, b = _data(m, n, k, torch.bfloat16, True)
    tiles = skinny_gemm.launch_config(n // 2 if swiglu else n, k, m, swiglu)
    early, late = ({**tiles, "TRIGGER_EARLY": flag} for flag in (True, False))
    out = skinny_gemm.skinny_linear(x, w, b, swiglu=swiglu, launch=early)
    assert torch.equal(out, skinny_gemm.skinny_linear(x, w, b, swiglu=swiglu, launch=late))


def test_a_grid_of_one_wave_triggers_its_dependents_at_its_start(monkeypatch):
    monkeypatch.setattr(skinny_gemm, "_num_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert skinny_gemm.trigger_early(4096, 32, cpu)  # o_proj and down of Llama-3.1-8B: 128 programs
    assert not skinny_gemm.trigger_early(14336, 64, cpu)  # gate_up: 224 programs, later ones wait for an SM

"""torch_causal_conv1d, torch_ssm and their plain helpers against transformers' Mamba2 reference code, fp32."""

import math

import pytest
import torch
from ad_compiler.custom_ops.mamba import causal_conv1d_with_state, ssm_discretize, ssm_scan, ssm_step
from ad_compiler.export.patches import hf_mamba2_ops as patch
from conftest import count_calls, export_fn
from transformers.models.bamba import modeling_bamba
from transformers.models.bamba.modeling_bamba import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba2_chunk_scan,
    mamba2_selective_state_update,
)

conv_op = torch.ops.auto_deploy.torch_causal_conv1d
ssm_op = torch.ops.auto_deploy.torch_ssm
INF = math.inf
TOL = 1e-5  # max |ours - reference| / max |reference|


def _close(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ours.dtype, ref.shape, ref.dtype)
    rel = (ours - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
    assert rel < tol, f"max abs diff is {rel:.2e} of the reference's scale"


def _ssm_inputs(b: int, s: int, h: int, p: int, g: int, n: int) -> dict[str, torch.Tensor]:
    """Mamba2-like values: A = -exp(A_log) < 0, dt before softplus around 0 (both clamps in LIMITS bite), as a mixer feeds the scan."""
    return {
        "x": torch.randn(b, s, h, p),
        "dt": torch.randn(b, s, h) * 2,
        "A": -torch.exp(torch.rand(h) * math.log(h + 1)),
        "B": torch.randn(b, s, g, n),
        "C": torch.randn(b, s, g, n),
        "D": torch.randn(h),
        "dt_bias": torch.randn(h) * 0.5,
    }


def _hf_scan(t: dict, chunk: int, limit: tuple[float, float], state: torch.Tensor | None = None,
             final: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], dt_bias=t["dt_bias"],
                             initial_states=state, dt_softplus=True, dt_limit=limit, return_final_states=final)


def _ours_scan(t: dict, chunk: int, limit: tuple[float, float],
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dts = ssm_discretize(t["dt"], t["dt_bias"], *limit)
    return ssm_scan(t["x"], dts, t["A"], t["B"], t["C"], t["D"], chunk, state)


# (b, s, h, p, g, n, chunk): s not a multiple of the chunk, one token, chunk larger than s, exact multiple,
# chunk of one, several groups (2 and 4 heads per group), one head per group.
SCAN_SHAPES = [
    (2, 7, 4, 3, 1, 5, 4),
    (2, 1, 4, 3, 2, 5, 4),
    (1, 13, 6, 4, 3, 8, 16),
    (2, 16, 4, 2, 2, 4, 4),
    (1, 5, 4, 2, 4, 3, 1),
    (2, 11, 8, 3, 2, 6, 3),
]
LIMITS = [(0.0, INF), (0.05, 0.4)]  # HF's default and finite clamps that bite (softplus of randn spans both)


@pytest.mark.parametrize("limit", LIMITS, ids=["no_limit", "clamped"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=lambda s: "b{}s{}h{}p{}g{}n{}c{}".format(*s))
def test_ssm_op_matches_hf_chunk_scan(shape, limit):
    *dims, chunk = shape
    t = _ssm_inputs(*dims)
    ref = _hf_scan(t, chunk, limit)
    out = ssm_op(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], chunk, *limit)
    _close(out, ref)


def test_dt_limit_clamps():
    t = _ssm_inputs(2, 6, 4, 3, 2, 5)
    raw = torch.nn.functional.softplus(t["dt"] + t["dt_bias"])
    assert (raw < 0.05).any() and (raw > 0.4).any()  # the clamp below changes values on both sides
    dts = ssm_discretize(t["dt"], t["dt_bias"], 0.05, 0.4)
    assert dts.dtype == torch.float32 and dts.min() >= 0.05 and dts.max() <= 0.4
    torch.testing.assert_close(ssm_discretize(t["dt"], t["dt_bias"], 0.0, INF), raw, rtol=0, atol=0)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"], 4)
    assert not torch.allclose(ssm_op(*args, 0.0, INF), ssm_op(*args, 0.05, 0.4))


@pytest.mark.parametrize("chunk", [3, 4, 32])
def test_scan_final_state_and_initial_state_match_hf(chunk):
    t = _ssm_inputs(2, 10, 4, 3, 2, 5)
    s0 = torch.randn(2, 4, 3, 5)
    ref_y, ref_state = _hf_scan(t, chunk, (0.0, INF), state=s0, final=True)
    y, state = _ours_scan(t, chunk, (0.0, INF), state=s0)
    _close(y, ref_y)
    _close(state, ref_state)


@pytest.mark.parametrize("split", [1, 4, 7, 9])
def test_scan_in_two_parts_equals_whole(split):
    t = _ssm_inputs(2, 10, 4, 3, 2, 5)
    dts = ssm_discretize(t["dt"], t["dt_bias"], 0.0, INF)
    whole_y, whole_state = ssm_scan(t["x"], dts, t["A"], t["B"], t["C"], t["D"], 4)
    parts = [slice(0, split), slice(split, 10)]
    ys, state = [], None
    for sl in parts:
        y, state = ssm_scan(t["x"][:, sl], dts[:, sl], t["A"], t["B"][:, sl], t["C"][:, sl], t["D"], 4, state)
        ys.append(y)
    _close(torch.cat(ys, dim=1), whole_y)
    _close(state, whole_state)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_step_token_by_token_equals_scan(g):
    t = _ssm_inputs(3, 6, 4, 3, g, 5)
    dts = ssm_discretize(t["dt"], t["dt_bias"], 0.0, INF)
    s0 = torch.randn(3, 4, 3, 5)
    whole_y, whole_state = ssm_scan(t["x"], dts, t["A"], t["B"], t["C"], t["D"], 4, s0)
    ys, state = [], s0
    for i in range(6):
        y, state = ssm_step(t["x"][:, i], dts[:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"], state)
        ys.append(y)
    _close(torch.stack(ys, dim=1), whole_y)
    _close(state, whole_state)


@pytest.mark.parametrize("g", [1, 2])
def test_step_matches_hf_selective_state_update(g):
    # HF's decode step takes per-(head, head-dim) dt, A, D and dt_bias, expanded from per-head values.
    r, h, p, n = 3, 4, 2, 5
    t = _ssm_inputs(r, 1, h, p, g, n)
    x, dt, B, C = t["x"][:, 0], t["dt"][:, 0], t["B"][:, 0], t["C"][:, 0]
    state = torch.randn(r, h, p, n)
    hf_state, before = state.clone(), state.clone()
    ref = mamba2_selective_state_update(
        hf_state, x, dt[..., None].expand(-1, -1, p), t["A"][:, None, None].expand(-1, p, n), B, C,
        t["D"][:, None].expand(-1, p), dt_bias=t["dt_bias"][:, None].expand(-1, p), dt_softplus=True)
    y, new_state = ssm_step(x, ssm_discretize(dt, t["dt_bias"], 0.0, INF), t["A"], B, C, t["D"], state)
    _close(y, ref)
    _close(new_state, hf_state)  # HF writes the new state in place
    assert torch.equal(state, before)  # ours leaves its input state alone


def test_empty_sequence_scan():
    t = _ssm_inputs(2, 0, 4, 3, 2, 5)
    s0 = torch.randn(2, 4, 3, 5)
    y, state = _ours_scan(t, 4, (0.0, INF), state=s0)
    assert y.shape == (2, 0, 4, 3) and torch.equal(state, s0)


# (b, s, c, k): s shorter than the kernel, one token, kernel of 2, long sequence.
CONV_SHAPES = [(2, 9, 12, 4), (2, 2, 6, 4), (1, 1, 5, 4), (3, 7, 8, 2), (1, 33, 10, 3)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "b{}s{}c{}k{}".format(*s))
def test_conv_op_matches_hf(shape, bias):
    b, s, c, k = shape
    x, w = torch.randn(b, s, c), torch.randn(c, k)
    bv = torch.randn(c) if bias else None
    out = conv_op(x, w, bv)
    _close(out, causal_conv1d_fn(x.transpose(1, 2), w, bv).transpose(1, 2))
    assert out.is_contiguous()  # like its fake: an exported view() of the output must hold at run time


@pytest.mark.parametrize("cuts", [[1], [3], [2, 3], [1] * 8])  # the last: one token at a time
def test_conv_in_pieces_with_state_equals_whole(cuts):
    b, s, c, k = 2, 9, 6, 4
    x, w, bias = torch.randn(b, s, c), torch.randn(c, k), torch.randn(c)
    whole, whole_state = causal_conv1d_with_state(x, w, bias, None)
    _close(whole, conv_op(x, w, bias))
    bounds = [0, *torch.tensor(cuts).cumsum(0).tolist(), s]
    ys, state = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        y, state = causal_conv1d_with_state(x[:, lo:hi], w, bias, state)
        ys.append(y)
    _close(torch.cat(ys, dim=1), whole)
    assert state.shape == (b, c, k - 1)
    torch.testing.assert_close(state, x[:, -(k - 1):].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(whole_state, state, rtol=0, atol=0)


def test_conv_with_state_matches_hf_update():
    # HF's decode conv: cat(state, x), conv without padding, the last s outputs; the state keeps the last inputs.
    b, s, c, k = 2, 3, 6, 4
    x, w, bias, prev = torch.randn(b, s, c), torch.randn(c, k), torch.randn(c), torch.randn(b, c, k - 1)
    hf_state = prev.clone()
    ref = causal_conv1d_update(x.transpose(1, 2), hf_state, w, bias).transpose(1, 2)
    y, state = causal_conv1d_with_state(x, w, bias, prev)
    _close(y, ref)
    torch.testing.assert_close(state, hf_state, rtol=0, atol=0)


def test_conv_keeps_input_dtype():
    x, w = torch.randn(2, 5, 4).to(torch.bfloat16), torch.randn(4, 3)
    out = conv_op(x, w, None)
    assert out.dtype == torch.bfloat16
    _close(out.float(), causal_conv1d_fn(x.transpose(1, 2), w, None).transpose(1, 2).float(), tol=1e-2)


def test_opcheck_both_ops():
    t = _ssm_inputs(2, 7, 4, 3, 2, 5)
    ssm_args = (t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["dt_bias"])
    torch.library.opcheck(ssm_op.default, (*ssm_args, 4, 0.0, INF))
    torch.library.opcheck(ssm_op.default, (*ssm_args, 16, 0.05, 0.4))
    x, w = torch.randn(2, 7, 10), torch.randn(10, 4)
    torch.library.opcheck(conv_op.default, (x, w, torch.randn(10)))
    torch.library.opcheck(conv_op.default, (x, w, None))


def test_fake_shapes_and_dtypes_on_meta():
    x = torch.empty(2, 7, 10, device="meta", dtype=torch.bfloat16)
    out = conv_op(x, torch.empty(10, 4, device="meta", dtype=torch.bfloat16), None)
    assert (out.shape, out.dtype, out.device.type) == ((2, 7, 10), torch.bfloat16, "meta")

    def m(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    y = ssm_op(m(2, 7, 4, 3), m(2, 7, 4), m(4), m(2, 7, 2, 5), m(2, 7, 2, 5), m(4), m(4), 4, 0.0, INF)
    assert (y.shape, y.dtype, y.device.type) == ((2, 7, 4, 3), torch.float32, "meta")


def test_export_one_node_each_dynamic():
    dyn = torch.export.Dim.DYNAMIC
    t = _ssm_inputs(2, 5, 4, 3, 2, 5)
    w = torch.randn(10, 4)

    def fn(xc, x, dt, B, C):
        return conv_op(xc, w, None), ssm_op(x, dt, t["A"], B, C, t["D"], t["dt_bias"], 4, 0.0, INF)

    args = (torch.randn(2, 5, 10), t["x"], t["dt"], t["B"], t["C"])
    ep = export_fn(fn, args, tuple({0: dyn, 1: dyn} for _ in args))
    assert count_calls(ep, conv_op) == 1 and count_calls(ep, ssm_op) == 1
    t2 = _ssm_inputs(3, 9, 4, 3, 2, 5)
    args2 = (torch.randn(3, 9, 10), t2["x"], t2["dt"], t2["B"], t2["C"])
    for got, want in zip(ep.module()(*args2), fn(*args2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_patch_functions_match_hf_and_restore():
    t = _ssm_inputs(2, 9, 4, 3, 2, 5)
    x, w, bias = torch.randn(2, 12, 9), torch.randn(12, 4), torch.randn(12)  # HF's conv layout [b, c, s]
    with patch.hf_mamba2_ops():
        assert modeling_bamba.causal_conv1d_fn is patch.causal_conv1d_fn
        assert modeling_bamba.mamba2_chunk_scan is patch.mamba2_chunk_scan
        _close(modeling_bamba.causal_conv1d_fn(x, w, bias, activation="silu"),
               causal_conv1d_fn(x, w, bias, activation="silu"))
        _close(modeling_bamba.mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=4, D=t["D"],
                                                dt_bias=t["dt_bias"], dt_softplus=True, dt_limit=(0.05, 0.4), z=None),
               _hf_scan(t, 4, (0.05, 0.4)))
        with pytest.raises(RuntimeError, match="unexpected mamba2_chunk_scan"):
            modeling_bamba.mamba2_chunk_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, return_final_states=True,
                                             dt_softplus=True)
    assert modeling_bamba.causal_conv1d_fn is causal_conv1d_fn
    assert modeling_bamba.mamba2_chunk_scan is mamba2_chunk_scan

"""The triton attention backend against torch_attention (Triton interpreter on CPU, compiled on GPU)."""

import pytest
import torch
from ad_runtime.attention import AttentionRegistry
from ad_runtime.kernels.triton import use_interpreter_without_gpu
from paged_attention_harness import run_paged_steps

try:
    use_interpreter_without_gpu()
    _UNAVAILABLE = ""
except RuntimeError as e:
    _UNAVAILABLE = str(e)
pytestmark = pytest.mark.skipif(bool(_UNAVAILABLE), reason=_UNAVAILABLE)
# Compiled Triton reads only GPU memory: where there is a GPU these run on it, else in the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# seq 0: prefill 7, chunked prefill 5, then decodes; seq 1: prefill 3, then decodes; seq 2 joins late
SCHEDULE = [
    [(0, 7), (1, 3)],
    [(0, 5), (2, 6), (1, 1)],
    [(2, 4), (0, 1), (1, 1)],
    [(0, 1), (1, 1), (2, 1)],
    [(0, 1), (2, 1)],
]
SEQ_LENS = [15, 6, 12]


def _check(results, atol=1e-4, rtol=1e-4):
    assert len(results) == len(SCHEDULE)
    for out, ref in results:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_prefill_only():
    (out, ref), = run_paged_steps("triton", [9], [[(0, 9)]], n_heads=2, n_kv_heads=2, page_size=16, device=DEVICE)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_mixed_steps_gqa(n_heads, n_kv_heads):
    _check(run_paged_steps("triton", SEQ_LENS, SCHEDULE, n_heads=n_heads, n_kv_heads=n_kv_heads, device=DEVICE))


@pytest.mark.parametrize(
    "kw",
    [
        {"sliding_window": 4},
        {"sinks": True},
        {"logit_cap": 2.0},
        {"sliding_window": 3, "sinks": True, "logit_cap": 5.0, "scale": 0.5},
    ],
)
def test_mixed_steps_options(kw):
    _check(run_paged_steps("triton", SEQ_LENS, SCHEDULE, page_size=3, **kw, device=DEVICE))


def test_decode_only_steps_and_one_token_prompt():
    res = run_paged_steps("triton", [1, 5], [[(1, 4), (0, 1)], [(1, 1)]], device=DEVICE)
    for out, ref in res:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_descriptor_contract():
    d = AttentionRegistry.get("triton")
    assert d.name == "triton" and d.layout() == "bsnd"
    assert d.cached_op() is torch.ops.auto_deploy.triton_cached_attention.default


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"sinks": True, "logit_cap": 5.0}])
def test_bf16_on_gpu(kw):
    _check(run_paged_steps("triton", SEQ_LENS, SCHEDULE, n_heads=8, n_kv_heads=2, head_dim=64, page_size=16,
                           dtype=torch.bfloat16, device="cuda", **kw), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_bf16_on_gpu_long_prefill_then_decode():
    # long enough for several key blocks, pages and decode splits
    sched = [[(0, 300), (1, 129)], [(0, 1), (1, 1)], [(0, 1), (1, 1)]]
    res = run_paged_steps("triton", [302, 131], sched, n_heads=32, n_kv_heads=8, head_dim=128, page_size=32,
                          num_pages=32, dtype=torch.bfloat16, device="cuda")
    for out, ref in res:
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)

"""The torch reference backend against torch_attention on equivalent non-paged inputs."""

import pytest
import torch
from ad_runtime.attention import AttentionRegistry
from paged_attention_harness import run_paged_steps

# seq 0: prefill 7, then chunked prefill 5, then decodes; seq 1: prefill 3, then decodes; seq 2 joins late
SCHEDULE = [
    [(0, 7), (1, 3)],
    [(0, 5), (2, 6), (1, 1)],
    [(2, 4), (0, 1), (1, 1)],
    [(0, 1), (1, 1), (2, 1)],
    [(0, 1), (2, 1)],
]
SEQ_LENS = [15, 6, 12]


def _check(results, atol=1e-5, rtol=1e-5):
    assert len(results) == len(SCHEDULE)
    for out, ref in results:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_prefill_only_single_page_size():
    (out, ref), = run_paged_steps("torch", [9], [[(0, 9)]], n_heads=2, n_kv_heads=2, page_size=16)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_mixed_steps_gqa(n_heads, n_kv_heads):
    _check(run_paged_steps("torch", SEQ_LENS, SCHEDULE, n_heads=n_heads, n_kv_heads=n_kv_heads))


@pytest.mark.parametrize(
    "kw",
    [
        {"sliding_window": 4},
        {"sinks": True},
        {"logit_cap": 2.0},
        {"scale": 0.3},
        {"sliding_window": 3, "sinks": True, "logit_cap": 5.0, "scale": 0.5},
    ],
)
def test_mixed_steps_options(kw):
    _check(run_paged_steps("torch", SEQ_LENS, SCHEDULE, page_size=3, **kw))


def test_decode_only_matches_and_one_token_prefill():
    # a 1-token prompt is handled as a decode over an empty cache
    res = run_paged_steps("torch", [1, 5], [[(1, 4), (0, 1)], [(1, 1)]])
    for out, ref in res:
        torch.testing.assert_close(out, ref)


def test_low_precision_cache_dtype():
    res = run_paged_steps("torch", SEQ_LENS, SCHEDULE, cache_dtype=torch.bfloat16)
    _check(res, atol=5e-2, rtol=5e-2)


def test_descriptor_contract():
    d = AttentionRegistry.get("torch")
    assert d.name == "torch" and d.layout() == "bsnd"
    assert d.source_op() is torch.ops.auto_deploy.torch_attention
    assert d.cached_op() is torch.ops.auto_deploy.torch_cached_attention.default


@pytest.mark.gpu
def test_bf16_on_gpu():
    res = run_paged_steps("torch", SEQ_LENS, SCHEDULE, dtype=torch.bfloat16, device="cuda", sliding_window=5)
    _check(res, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 3}, {"sinks": True, "logit_cap": 4.0},
                                {"cache_dtype": torch.bfloat16}])
def test_lone_decode_over_consecutive_and_scattered_pages(kw):
    # A lone decode row on the CPU reads its pages as a view of the cache when they are consecutive (seq 0 here:
    # prefilled alone) and gathers them otherwise (seq 1: its chunks interleaved with seq 2's pages).
    schedule = [
        [(0, 9)],
        [(0, 1)],
        [(1, 3), (2, 4)],
        [(1, 4), (2, 4)],
        [(1, 1)],
        [(2, 1)],
    ]
    tol = 5e-2 if "cache_dtype" in kw else 1e-5
    for out, ref in run_paged_steps("torch", [11, 9, 10], schedule, page_size=2, **kw):
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)

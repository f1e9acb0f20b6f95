"""The flashinfer attention backend: install hint without flashinfer; on a GPU, against torch_attention and
through a captured CUDA graph replayed on new decode metadata."""

import importlib.util

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_runtime.attention import AttentionRegistry
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.kv_cache.sequence_info import SequenceInfo
from paged_attention_harness import run_paged_steps

HAVE_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
needs_flashinfer = pytest.mark.skipif(not HAVE_FLASHINFER, reason="flashinfer is not installed")

SCHEDULE = [
    [(0, 7), (1, 3)],
    [(0, 5), (2, 6), (1, 1)],
    [(2, 4), (0, 1), (1, 1)],
    [(0, 1), (1, 1), (2, 1)],
    [(0, 1), (2, 1)],
]
SEQ_LENS = [15, 6, 12]


@pytest.mark.skipif(HAVE_FLASHINFER, reason="flashinfer is installed")
def test_missing_flashinfer_gives_install_hint():
    with pytest.raises(CompileError, match=r"pip install 'ad-runtime\[flashinfer\]'"):
        AttentionRegistry.get("flashinfer")


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"sinks": True, "logit_cap": 5.0}])
@pytest.mark.parametrize("n_heads, n_kv_heads", [(8, 2), (4, 4)])
def test_bf16_mixed_steps_on_gpu(kw, n_heads, n_kv_heads):
    res = run_paged_steps("flashinfer", SEQ_LENS, SCHEDULE, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=64,
                          page_size=16, dtype=torch.bfloat16, device="cuda", **kw)
    for out, ref in res:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


# Ten sequences: decodes of 10 rows go to FlashInfer's decode, those of fewer than 8 rows to the split-KV
# Triton kernel; a mixed step has both a prefill chunk and a small decode.
WIDE_PREFILL = [9, 21, 4, 17, 12, 30, 7, 16, 25, 11]
WIDE_SCHEDULE = [
    [(i, n) for i, n in enumerate(WIDE_PREFILL)],
    [(i, 1) for i in range(10)],
    [(i, 1) for i in range(10)],
    [(9, 7), (0, 1), (3, 1), (5, 1)],
]
WIDE_SEQ_LENS = [n + 2 + (i in (0, 3, 5)) + 7 * (i == 9) for i, n in enumerate(WIDE_PREFILL)]


@pytest.mark.gpu
@needs_flashinfer
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"sinks": True, "logit_cap": 5.0}])
def test_bf16_large_and_small_decode_batches_on_gpu(kw):
    res = run_paged_steps("flashinfer", WIDE_SEQ_LENS, WIDE_SCHEDULE, n_heads=8, n_kv_heads=2, head_dim=64,
                          page_size=16, dtype=torch.bfloat16, device="cuda", **kw)
    for out, ref in res:
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_flashinfer
# Decode rows go to the split-KV Triton kernel; an fp8 cache under bf16 queries to FlashInfer's planned decode.
@pytest.mark.parametrize("rows, cache_dtype", [(2, torch.bfloat16), (9, torch.bfloat16), (9, torch.float8_e4m3fn)])
def test_cuda_graph_decode_replays_with_new_plan(rows, cache_dtype):
    """Capture one decode step, then replay it on later steps after host_prepare re-plans (no re-capture)."""
    torch.manual_seed(0)
    desc = AttentionRegistry.get("flashinfer")
    ref_desc = AttentionRegistry.get("torch")
    n, n_kv, d, ps, pages, dev, dt = 8, 2, 64, 16, 32, "cuda", torch.bfloat16
    info = SequenceInfo(max_batch_size=rows, max_seq_len=64, page_size=ps, max_num_tokens=256, device=dev)
    info.scratch_page = pages
    info.cuda_graph_batch_sizes = [rows]  # steps after the capture plan the graph wrapper in host_prepare
    pool = PagePool(pages, ps)
    k_cache = torch.zeros(pages + 1, ps, n_kv, d, dtype=cache_dtype, device=dev)
    v_cache = torch.zeros_like(k_cache)
    desc.on_cache_init({"k_cache": k_cache, "v_cache": v_cache})

    def call(d_, q, k, v, kc, vc):
        named = info.args()
        meta = [named[name] for name in d_.metadata_names()]
        return d_.cached_op()(q, k, v, *meta, kc, vc, None, None, None, None)

    # prefill the sequences eagerly (this also tells the backend the layer configuration)
    lens = [20, 9] + [5 + 3 * i for i in range(rows - 2)]
    for i, s in enumerate(lens):
        pool.ensure_capacity(i, s)
    info.nest_sequences([[0] * s for s in lens], [0] * rows, [pool.page_table(i) for i in range(rows)])
    desc.host_prepare(info)
    q, k, v = (torch.randn(1, sum(lens), h, d, device=dev, dtype=dt) for h in (n, n_kv, n_kv))
    call(desc, q, k, v, k_cache, v_cache)

    static = [torch.zeros(1, rows, h, d, device=dev, dtype=dt) for h in (n, n_kv, n_kv)]
    graph, done = None, list(lens)
    for step in range(4):
        for i in range(rows):
            pool.ensure_capacity(i, done[i] + 1)
        info.nest_sequences([[0]] * rows, done, [pool.page_table(i) for i in range(rows)])
        desc.host_prepare(info)
        new = [torch.randn_like(t) for t in static]
        for s_, n_ in zip(static, new):
            s_.copy_(n_)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        ref = call(ref_desc, *new, ref_k, ref_v)
        if graph is None:
            side = torch.cuda.Stream()  # warm-up on a side stream, as the cudagraph compile backend does
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                call(desc, *static, k_cache.clone(), v_cache.clone())  # eager warm-up on scratch copies
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = call(desc, *static, k_cache, v_cache)
        graph.replay()
        torch.cuda.synchronize()
        tol = 2e-2 if cache_dtype == dt else 6e-2  # both read the same fp8 values; they sum in other orders
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
        done = [x + 1 for x in done]


@needs_flashinfer  # importing the backend needs flashinfer; the test itself runs on a CPU
def test_step_batch_is_built_once_per_step_and_rebuilt_when_it_changes():
    from ad_runtime.attention import flashinfer_backend as fb

    def batch(seq_len: list[int], input_pos: list[int], pages: torch.Tensor):
        sl, ip = torch.tensor(seq_len, dtype=torch.int32), torch.tensor(input_pos, dtype=torch.int32)
        cu = torch.zeros(len(seq_len) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(sl, 0)
        info = torch.tensor([1, seq_len[0], len(seq_len) - 1], dtype=torch.int32)
        return fb._Batch.from_host(info, sl, ip, cu, pages, 4)

    pages = torch.arange(16, dtype=torch.int32)
    first = batch([5, 1], [0, 6], pages)
    assert first.kv_indptr.tolist() == [0, 2, 4] and first.last_page_len.tolist() == [1, 3]
    assert batch([5, 1], [0, 6], pages) is first  # the next layer of the same step
    moved = batch([5, 1], [0, 7], pages)  # the next step: one more cached token
    assert moved is not first and moved.kv_indptr.tolist() == [0, 2, 4] and moved.last_page_len.tolist() == [1, 4]
    assert batch([5, 1], [0, 7], torch.arange(12, dtype=torch.int32)) is not moved  # other page buffer

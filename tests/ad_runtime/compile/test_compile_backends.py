"""Compile backend registry, `auto` resolution and default CUDA-graph batch sizes."""

import pytest
from ad_compiler.errors import CompileError
from ad_runtime.compile import CompileBackendRegistry, resolve_compile_backend
from ad_runtime.compile.backends import default_cuda_graph_batch_sizes
from ad_runtime.kv_cache.interface import CachedSequenceInterface


def test_names_and_auto():
    assert CompileBackendRegistry.names() == ["torch-compile", "torch-cudagraph", "torch-opt", "torch-simple"]
    assert resolve_compile_backend("auto", "cpu") == "torch-simple"
    assert resolve_compile_backend("auto", "cuda") == "torch-opt"
    assert resolve_compile_backend("torch-compile", "cuda") == "torch-compile"
    with pytest.raises(CompileError, match="unknown compile backend"):
        CompileBackendRegistry.get("tensorrt")


@pytest.mark.parametrize("max_bs, expect", [
    (1, [1]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 32, 40]),
    (256, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]),
])
def test_default_batch_sizes(max_bs, expect):
    cm = CachedSequenceInterface(max_batch_size=max_bs, max_seq_len=8, page_size=4)
    assert default_cuda_graph_batch_sizes(cm) == expect


def test_default_batch_sizes_pad_by_15_rows_or_a_quarter_at_most():
    cm = CachedSequenceInterface(max_batch_size=1000, max_seq_len=8, page_size=4)
    sizes = default_cuda_graph_batch_sizes(cm)
    assert sizes[-1] == 1000 and len(sizes) < 40
    for rows in range(1, 1001):
        padded = next(s for s in sizes if s >= rows)
        assert padded - rows <= 15 or padded <= 1.25 * rows, (rows, padded)

"""argmax_rows (two Triton launches) against torch.argmax: first index of the maximum, NaN as the maximum."""

import pytest
import torch
from ad_runtime.kernels.triton.argmax import CHUNK, argmax_rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [7, CHUNK, 2 * CHUNK + 5])
def test_matches_torch_argmax(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=g).to(dtype)
    x[1, :] = 0.0  # all equal: index 0
    x[2, vocab // 3] = x[2, vocab - 1] = 50.0  # a tie across chunks: the first
    x[3, vocab - 1] = float("nan")  # NaN wins, as in torch
    x = x.to(_device())
    out = argmax_rows(x)
    assert out.dtype == torch.int64
    assert torch.equal(out.cpu(), torch.argmax(x.cpu(), dim=-1))


def test_strided_rows_and_no_rows():
    x = torch.randn(3, 2 * CHUNK + 9, device=_device())[:, 5:]  # rows at a stride, not contiguous as a whole
    assert torch.equal(argmax_rows(x).cpu(), torch.argmax(x.cpu(), dim=-1))
    assert argmax_rows(x[:0]).shape == (0,)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32, 256])
def test_llama_vocab_on_gpu(rows):
    x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(argmax_rows(x), torch.argmax(x, dim=-1))

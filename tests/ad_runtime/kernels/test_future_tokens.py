"""resolve_future_tokens_ (one Triton launch) against the torch form SequenceInfo uses on a CPU."""

import pytest
import torch
from ad_runtime.kernels.triton.future_tokens import resolve_future_tokens_


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _reference(ids: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    rows = (-ids - 1).clamp(min=0, max=future.numel() - 1)
    return torch.where(ids < 0, future[rows], ids)


@pytest.mark.parametrize("n", [1, 7, 1500])
def test_placeholders_take_the_previous_rows_and_real_ids_stay(n):
    g = torch.Generator().manual_seed(n)
    future = torch.randint(0, 50_000, (9,), generator=g)
    ids = torch.randint(0, 50_000, (n,), generator=g)
    holes = torch.rand(n, generator=g) < 0.5
    ids[holes] = -torch.randint(1, 10, (int(holes.sum()),), generator=g)  # rows 0..8 of the previous step
    want = _reference(ids, future)
    got = ids.to(_device())
    resolve_future_tokens_(got, future.to(_device()))
    assert torch.equal(got.cpu(), want)


def test_a_future_from_a_strided_view_and_empty_inputs():
    dev = _device()
    future = torch.arange(100, 120, device=dev)[::2]  # 100, 102, ... not contiguous
    ids = torch.tensor([-1, 5, -3, -10], device=dev)
    resolve_future_tokens_(ids, future)
    assert ids.tolist() == [100, 5, 104, 118]
    empty = torch.empty(0, dtype=torch.int64, device=dev)
    resolve_future_tokens_(empty, future)  # nothing to do, no launch

"""Kernel tests run Triton in its CPU interpreter when there is no GPU; skipped when that is impossible here."""

import pytest
from ad_runtime.kernels.triton import use_interpreter_without_gpu

try:
    use_interpreter_without_gpu()
    _UNAVAILABLE = ""
except RuntimeError as e:  # triton was imported compiled in this process, and there is no GPU
    _UNAVAILABLE = str(e)


@pytest.fixture(autouse=True)
def _triton_runnable() -> None:
    if _UNAVAILABLE:
        pytest.skip(_UNAVAILABLE)

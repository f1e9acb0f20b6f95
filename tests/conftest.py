"""Test-session setup: skip GPU tests cleanly where there is no GPU, and run the longest files first."""

import os
import sys

import pytest


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _files_with_most_slow_tests_first(items)
    n = None
    for item in items:
        if "gpu" in item.keywords or "multigpu" in item.keywords:
            n = _cuda_count() if n is None else n
            if "multigpu" in item.keywords and n < 2:
                item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))
            elif n < 1:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def _files_with_most_slow_tests_first(items: list[pytest.Item]) -> None:
    """Reorder whole files, those with the most `slow` tests first, each file's tests in their order: the README's
    `-n 2 --dist loadfile` hands files to two workers in this order, and a long file handed out last ran alone at
    the end (2-core VM, fresh clone: 44 min in one process, 29 in two in the collected order, 26 in this one; 16-17
    min since ranks fork from a server that preloaded torch's export stack and the GGUF conversion reads once)."""
    slow: dict[object, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + ("slow" in item.keywords)
    items.sort(key=lambda item: -slow[item.path])  # stable: files stay whole, ties keep the collected order


# Triton fixes compiled-vs-interpreted when triton.language is first imported, and without a GPU only
# its CPU interpreter can run kernels; choose it before any test module imports triton.
if "triton" not in sys.modules and _cuda_count() == 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The build cache stays off in tests unless a test turns it on with its own folder: a hit would skip transforms
# that tests patch or inspect, and tests must not fill the user's cache. Subprocesses inherit the setting.
os.environ.setdefault("AD_BUILD_CACHE", "false")

# Ranks fork from one server process that imported torch once, instead of each importing it again: the suite
# launches ranks ~40 times (about 4 s saved each on the 2-core VM). Production keeps "spawn" (launch's default);
# test_launch covers both, and tests that name a start method keep theirs.
os.environ.setdefault("AUTODEPLOY_RANK_START_METHOD", "forkserver")

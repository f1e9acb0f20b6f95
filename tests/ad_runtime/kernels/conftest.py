"""Kernel tests run Triton in its CPU interpreter when there is no GPU (set before any kernel is defined)."""

from ad_runtime.kernels.triton import use_interpreter_without_gpu

use_interpreter_without_gpu()

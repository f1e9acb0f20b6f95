"""Top-p (and top-k with it) sampling through FlashInfer's sorting-free kernels, where FlashInfer is installed.

The torch path sorts the whole vocabulary of every sampled row (a 254-row step of a 128k-vocabulary model: ~3 ms on
an H200, benchmarks/README.md, thirteenth session). FlashInfer draws by rejection sampling without a sort. It takes
one random stream for the batch, so rows with a seed of their own keep the torch path; so does every CPU run.
`AUTODEPLOY_FLASHINFER_SAMPLING=0` keeps the torch path everywhere (for A/Bs).

FlashInfer compiles these kernels on their first use on a machine (its JIT: ~100 s on a fresh H200 host, where
the whole 8B build takes ~50 s), so a thread loads them in the background from the sampler's construction on;
top-p batches sort with torch until they are ready, and a log line says when they are.
"""

import functools
import logging
import os
import threading
import time
from types import ModuleType

import torch

from .device_tensor import device_tensor
from .errors import first_line

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def flashinfer_sampling() -> ModuleType | None:
    """flashinfer.sampling, or None where FlashInfer is not installed or the switch turns it off (read once)."""
    if os.environ.get("AUTODEPLOY_FLASHINFER_SAMPLING", "1") == "0":
        return None
    try:
        import flashinfer.sampling as sampling
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - an install that cannot load: say why, then sample with torch
        logger.warning("FlashInfer is installed but its sampling kernels cannot load (%s); top-p sampling sorts with "
                       "torch", e)
        return None
    return sampling


_ready = threading.Event()  # set once the loader thread has the compiled kernels
_loader: list[threading.Thread] = []  # the one loader thread of this process, once started
_failed: list[str] = []  # why the kernels cannot be used (a failed compile or run): the torch path then


def _fail(e: Exception, when: str) -> None:
    _failed.append(str(e))
    logger.warning("FlashInfer's sampling kernels failed to %s (%s); top-p sampling sorts with torch", when,
                   first_line(e))


def _load(sampling: ModuleType) -> None:
    start = time.perf_counter()
    try:
        sampling.get_sampling_module()  # compiles on a machine's first use, else loads the cached build
    except Exception as e:  # noqa: BLE001 - the torch path samples correctly; say why it is the one used
        _fail(e, "compile or load")
        return
    _ready.set()
    logger.info("top-p sampling through FlashInfer's sorting-free kernels (ready %.1f s after the sampler was built)",
                time.perf_counter() - start)


def start_loading(device: torch.device) -> None:
    """Load (compile on first use) the kernels on a background thread, once per process, for a GPU `device`."""
    if device.type != "cuda" or _loader or _failed:
        return
    sampling = flashinfer_sampling()
    if sampling is None:
        return
    _loader.append(threading.Thread(target=_load, args=(sampling,), name="flashinfer-sampling-load", daemon=True))
    _loader[0].start()


def wait_ready(timeout: float | None = None) -> bool:
    """Wait for the loader (benchmarks and tests, so that every timed batch takes one path); True when the kernels
    are ready to draw."""
    if _loader:
        _loader[0].join(timeout)
    return _ready.is_set() and not _failed


def can_draw(logits: torch.Tensor, cut_p: bool, seeded: bool) -> bool:
    """Whether draw() applies: a GPU batch with a top-p cut and no seeded row, FlashInfer's kernels loaded and
    working."""
    return (logits.is_cuda and cut_p and not seeded and _ready.is_set() and not _failed
            and flashinfer_sampling() is not None)


def draw(logits: torch.Tensor, ks: list[int], top_ps: list[float], cut_k: bool) -> torch.Tensor | None:
    """One token per row of float32 logits [R, V] (temperature applied): top-k (`ks`, V for none) first, then top-p
    over what remains, renormalised, as the torch path does. Returns int64 ids, or None where the kernels failed
    to run (said once; the caller then samples with torch, as every later batch does)."""
    sampling = flashinfer_sampling()
    p_t = device_tensor(top_ps, logits.device, torch.float32)
    try:
        if cut_k:
            k_t = device_tensor(ks, logits.device, torch.int32)
            out = sampling.top_k_top_p_sampling_from_logits(logits, k_t, p_t, filter_apply_order="top_k_first")
        else:
            out = sampling.top_p_sampling_from_probs(torch.softmax(logits, dim=-1), p_t)
    except Exception as e:  # noqa: BLE001 - e.g. kernels built for another GPU: the torch path samples correctly
        _fail(e, "run")
        return None
    return out.long()

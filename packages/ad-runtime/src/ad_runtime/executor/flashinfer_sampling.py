"""Top-p (and top-k with it) sampling through FlashInfer's sorting-free kernels, where FlashInfer is installed.

The torch path sorts the whole vocabulary of every sampled row (a 254-row step of a 128k-vocabulary model: ~3 ms on
an H200, benchmarks/README.md, thirteenth session). FlashInfer draws by rejection sampling without a sort. It takes
one random stream for the batch, so rows with a seed of their own keep the torch path; so does every CPU run.
`AUTODEPLOY_FLASHINFER_SAMPLING=0` keeps the torch path everywhere (for A/Bs).
"""

import functools
import logging
import os
from types import ModuleType

import torch

from .device_tensor import device_tensor

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
    logger.info("top-p sampling through FlashInfer's sorting-free kernels")
    return sampling


# Set when the kernels failed to run in warm_up (e.g. FlashInfer could not compile them): the torch path then.
_failed: list[str] = []


def can_draw(logits: torch.Tensor, cut_p: bool, seeded: bool) -> bool:
    """Whether draw() applies: a GPU batch with a top-p cut and no seeded row, FlashInfer available and working."""
    return logits.is_cuda and cut_p and not seeded and not _failed and flashinfer_sampling() is not None


def draw(logits: torch.Tensor, ks: list[int], top_ps: list[float], cut_k: bool) -> torch.Tensor:
    """One token per row of float32 logits [R, V] (temperature applied): top-k (`ks`, V for none) first, then top-p
    over what remains, renormalised, as the torch path does. Returns int64 ids."""
    sampling = flashinfer_sampling()
    p_t = device_tensor(top_ps, logits.device, torch.float32)
    if cut_k:
        k_t = device_tensor(ks, logits.device, torch.int32)
        out = sampling.top_k_top_p_sampling_from_logits(logits, k_t, p_t, filter_apply_order="top_k_first")
    else:
        out = sampling.top_p_sampling_from_probs(torch.softmax(logits, dim=-1), p_t)
    return out.long()


def warm_up(device: torch.device) -> None:
    """Run both kernels once on `device`, so that a FlashInfer that compiles them on first use (its JIT) does so
    while the engine is built, not inside the first sampled request."""
    if device.type != "cuda" or flashinfer_sampling() is None or _failed:
        return
    try:
        logits = torch.zeros(2, 64, device=device)
        for cut_k in (False, True):
            draw(logits, [8, 64], [0.9, 0.5], cut_k)
    except Exception as e:  # noqa: BLE001 - the torch path samples correctly; say why it is the one used
        _failed.append(str(e))
        logger.warning("FlashInfer's sampling kernels failed to run (%s); top-p sampling sorts with torch",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)

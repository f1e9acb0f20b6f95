"""Patch `hf_causal_mask`: no mask tensors in the graph; sdpa attention relies on is_causal=True instead.

transformers 5 builds the causal mask from `position_ids` (packed-sequence detection with diff/cumsum/index)
and hands it to attention. Exported, that is a data-dependent subgraph no attention matcher recognises.
While patched, the mask functions return None for sdpa models (attention then runs with attn_mask=None,
is_causal=True, see `hf_sdpa_attention`; a sliding window travels as node metadata). Other attention
implementations (eager, used where sdpa would drop a logit soft-cap) get a plain additive causal (or
sliding-window) mask `[1, 1, s, s]` built here from arange comparisons: HF's own builders create tensor
constants that, traced on meta, would be lifted without values.
"""

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import ExportPatchRegistry
from ._util import replace_everywhere

_MASK_FUNCTIONS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def additive_causal_mask(inputs_embeds: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """0 where query i may see key j (j <= i, and j > i - window), dtype-min elsewhere; [1, 1, s, s].

    Written as HF's mask functions are (`kv_idx <= q_idx`, `kv_idx > q_idx - window`), the form the
    attention matchers' `classify_mask` proves causal and reads the window from.
    """
    seq, device, dtype = inputs_embeds.shape[1], inputs_embeds.device, inputs_embeds.dtype
    # q_idx [1, 1, S, 1] and kv_idx [1, 1, 1, S] by unsqueezes, as transformers' sdpa_mask lays them out.
    q = torch.arange(seq, device=device).unsqueeze(0).unsqueeze(0).unsqueeze(-1)
    k = torch.arange(seq, device=device).unsqueeze(0).unsqueeze(0).unsqueeze(0)
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    # Python scalars, not tensors: a tensor constant traced on meta would be lifted without its value.
    # The mask is float32 whatever the model dtype; HF's eager attention adds it and softmaxes in float32.
    return torch.where(allowed, 0.0, torch.finfo(dtype).min)


def _patched(original: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(original)

    def create_mask(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        config = bound.arguments["config"]
        has_user_mask = bound.arguments.get("attention_mask") is not None
        if has_user_mask or bound.arguments.get("past_key_values") is not None:
            return original(*args, **kwargs)  # not the export path (padding masks or a KV cache): untouched
        impl = getattr(config, "_attn_implementation", None)
        if impl == "sdpa":
            return None
        if impl == "eager" and original.__name__ != "create_chunked_causal_mask":
            window = getattr(config, "sliding_window", None) if "sliding" in original.__name__ else None
            return additive_causal_mask(bound.arguments["inputs_embeds"], window)
        bound.arguments["position_ids"] = None
        return original(*bound.args, **bound.kwargs)

    create_mask.__wrapped__ = original  # type: ignore[attr-defined]
    return create_mask


@ExportPatchRegistry.register("hf_causal_mask")
def hf_causal_mask() -> AbstractContextManager[None]:
    from transformers import masking_utils

    originals = [getattr(masking_utils, name, None) for name in _MASK_FUNCTIONS]
    return replace_everywhere({f: _patched(f) for f in originals if f is not None}, "transformers")

"""Patch `hf_causal_mask`: no mask tensors in the graph; sdpa attention relies on is_causal=True instead.

transformers 5 builds the causal mask from `position_ids` (packed-sequence detection with diff/cumsum/index)
and hands it to attention. Exported, that is a data-dependent subgraph no attention matcher recognises.
While patched, the mask functions return None for sdpa models (attention then runs with attn_mask=None,
is_causal=True, see `hf_sdpa_attention`; a sliding window travels as node metadata). Other attention
implementations (eager, used where sdpa would drop a logit soft-cap) still get a mask, built without the
packed-sequence detection: a plain causal (or sliding-window) mask.
"""

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

from . import ExportPatchRegistry
from ._util import replace_everywhere

_MASK_FUNCTIONS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def _patched(original: Callable[..., Any]) -> Callable[..., Any]:
    sig = inspect.signature(original)

    def create_mask(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        config = bound.arguments["config"]
        has_user_mask = bound.arguments.get("attention_mask") is not None
        if has_user_mask or bound.arguments.get("past_key_values") is not None:
            return original(*args, **kwargs)  # not the export path (padding masks or a KV cache): untouched
        if getattr(config, "_attn_implementation", None) == "sdpa":
            return None
        bound.arguments["position_ids"] = None
        return original(*bound.args, **bound.kwargs)

    create_mask.__wrapped__ = original  # type: ignore[attr-defined]
    return create_mask


@ExportPatchRegistry.register("hf_causal_mask")
@contextlib.contextmanager
def hf_causal_mask() -> Iterator[None]:
    from transformers import masking_utils

    with contextlib.ExitStack() as stack:
        for name in _MASK_FUNCTIONS:
            original = getattr(masking_utils, name, None)
            if original is None:
                continue
            stack.enter_context(replace_everywhere(original, _patched(original), "transformers"))
        yield

"""Patch `hf_sdpa_attention`: HF's sdpa attention as one plain `aten.scaled_dot_product_attention` call.

While patched, every attention module with attn implementation "sdpa" calls
`F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=<module scaling>,
enable_gqa=<n_heads != n_kv_heads>)` with q [b, n_heads, s, d] and k/v [b, n_kv_heads, s, d] (no repeat_kv).
HF's own version decides is_causal from `q_len > 1`, which under dynamic shapes is a guard on the sequence
length. The module's sliding window (None when full attention) is attached to the sdpa node as
`node.meta["custom"]["sliding_window"]` so the attention matcher can carry it into torch_attention.
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from . import ExportPatchRegistry


def _sliding_window(module: torch.nn.Module) -> int | None:
    # Gemma2/3, Qwen2/3 keep it per layer; Mistral/Mixtral/Phi-3 read it from the config on every layer.
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is not None and layer_idx is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


def sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if attention_mask is not None:
        raise RuntimeError("export patch hf_sdpa_attention expects attention_mask=None (apply hf_causal_mask too)")
    window = kwargs.get("sliding_window", _sliding_window(module))
    gqa = query.shape[1] != key.shape[1]
    with torch.fx.traceback.annotate({"sliding_window": window}):
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=True, scale=scaling, enable_gqa=gqa
        )
    return out.transpose(1, 2).contiguous(), None


@ExportPatchRegistry.register("hf_sdpa_attention")
@contextlib.contextmanager
def hf_sdpa_attention() -> Iterator[None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = mapping["sdpa"]
    mapping["sdpa"] = sdpa_attention_forward
    try:
        yield
    finally:
        mapping["sdpa"] = original

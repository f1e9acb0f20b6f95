"""Patch `hf_gpt_oss_attention`: gpt-oss attention (learned per-head sinks) as one canonical torch_attention call.

gpt-oss has no sdpa implementation (sdpa has no sinks), so HF runs its eager function: scores, a sink
logit per head concatenated before the softmax and dropped after it. Traced, that is a softmax over
`cat(scores, sinks)` that no attention matcher claims, and the model would run without a KV cache. While
patched, the eager function emits `auto_deploy::torch_attention(q, k, v, is_causal=True, scale, sinks,
sliding_window)` in bnsd layout directly. The mask HF passes is the plain causal (or sliding-window) mask
of `hf_causal_mask` at export, which is_causal and the module's window say already, so it is dropped.
"""

import contextlib
import sys
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import ExportPatchRegistry
from ._util import replace_everywhere

_MODULE = "transformers.models.gpt_oss.modeling_gpt_oss"


def gpt_oss_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    out = torch.ops.auto_deploy.torch_attention(
        query, key, value, None, 0.0, True, scaling, module.sinks, window, None, "bnsd"
    )
    return out.transpose(1, 2).contiguous(), None


@ExportPatchRegistry.register("hf_gpt_oss_attention")
def hf_gpt_oss_attention() -> AbstractContextManager[None]:
    import ad_compiler.custom_ops.attention  # noqa: F401  (registers auto_deploy::torch_attention)

    modeling = sys.modules.get(_MODULE)  # a gpt-oss model being exported has imported it already
    if modeling is None:
        return contextlib.nullcontext()
    return replace_everywhere({modeling.eager_attention_forward: gpt_oss_attention_forward}, _MODULE)

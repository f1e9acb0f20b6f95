"""Patch `hf_minimax_lightning`: MiniMax's lightning-attention layers call canonical torch_linear_attention.

HF's layer loops over blocks of `block_size` tokens, a loop whose count export would tie to the example's
length. The math is plain decayed linear attention (S_t = e^{-slope} S_{t-1} + k_t v_t^T, o_t = q_t^T S_t),
so while patched the layer's no-cache forward computes q/k/v as HF does, calls the canonical op with
g = -slope per head, then applies HF's norm, output gate and projection unchanged.
"""

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from . import ExportPatchRegistry
from ._util import loaded, swapped


def lightning_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                      attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    import ad_compiler.custom_ops  # noqa: F401 - registers torch_linear_attention

    if past_key_values is not None:
        raise RuntimeError("export patch hf_minimax_lightning: unexpected call with a cache")
    b, s, _ = hidden_states.shape
    h, d = self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states)).reshape(b, s, h, 3 * d)
    q, k, v = torch.split(qkv, d, dim=3)
    g = (-self.slope_rate.reshape(1, 1, h).to(torch.float32)).expand(b, s, h)
    out = torch.ops.auto_deploy.torch_linear_attention(q, k, v, g).reshape(b, s, h * d)
    out = F.sigmoid(self.output_gate(hidden_states)) * self.norm(out)
    return self.out_proj(out), None


@ExportPatchRegistry.register("hf_minimax_lightning")
def hf_minimax_lightning() -> AbstractContextManager[None]:
    # Only where a MiniMax model has imported its modeling module.
    return swapped([(modeling.MiniMaxLightningAttention, "forward", lightning_forward)
                    for modeling in loaded(["transformers.models.minimax.modeling_minimax"])])

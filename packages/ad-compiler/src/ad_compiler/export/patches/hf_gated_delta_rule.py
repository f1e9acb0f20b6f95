"""Patch `hf_gated_delta_rule`: gated delta-net layers (Qwen3-Next, Qwen3.5) call our canonical op.

Their no-cache path calls the module-level `torch_chunk_gated_delta_rule(q, k, v, g=..., beta=...,
initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=True)`; traced, its chunk loop and
triangular solve are dozens of ops tied to the example's length. While patched it is one
`auto_deploy::torch_gated_delta_rule` node, which the runtime swaps for a version with per-sequence state.
The layers' causal conv goes through `hf_mamba2_ops` (same `causal_conv1d_fn`).
"""

from contextlib import AbstractContextManager
from typing import Any

import torch

from . import ExportPatchRegistry
from ._util import loaded, swapped

DELTA_NET_MODULES = (
    "transformers.models.qwen3_next.modeling_qwen3_next",
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
)


def chunk_gated_delta_rule(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    chunk_size: int = 64, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    import ad_compiler.custom_ops  # noqa: F401 - registers torch_gated_delta_rule

    if initial_state is not None or output_final_state or kwargs.get("cu_seqlens") is not None:
        raise RuntimeError("export patch hf_gated_delta_rule: unexpected call with state or packed sequences")
    out = torch.ops.auto_deploy.torch_gated_delta_rule(query, key, value, g, beta, bool(use_qk_l2norm_in_kernel))
    return out, None


@ExportPatchRegistry.register("hf_gated_delta_rule")
def hf_gated_delta_rule() -> AbstractContextManager[None]:
    return swapped([(mod, "torch_chunk_gated_delta_rule", chunk_gated_delta_rule) for mod in loaded(DELTA_NET_MODULES)
                    if hasattr(mod, "torch_chunk_gated_delta_rule")])

"""Patch `hf_mamba2_ops`: HF Mamba2 mixers call our canonical conv and scan ops instead of their reference code.

Mamba2-style mixers (Mamba2, Bamba, NemotronH, FalconH1, GraniteMoeHybrid, Zamba2; LFM2's short convs and
the delta-net layers use the first only) call two module-level functions on the no-cache path that export
takes: `causal_conv1d_fn(x [b, c, s], weight [c, k], bias, activation)` and `mamba2_chunk_scan(x [b, s, h, p],
dt, A, B, C, chunk_size, D=..., dt_bias=..., dt_softplus=True, dt_limit=...)`. While patched they become
`auto_deploy::torch_causal_conv1d` (plus the activation) and `auto_deploy::torch_ssm`, one node each, which the
runtime later swaps for versions with cached state. Pattern-matching the reference scan's ~40 ops after export
would be far more fragile.
"""

import math
from contextlib import AbstractContextManager
from typing import Any

import torch

from . import ExportPatchRegistry
from ._util import loaded, swapped

MIXER_MODULES = (
    "transformers.models.mamba2.modeling_mamba2",
    "transformers.models.bamba.modeling_bamba",
    "transformers.models.nemotron_h.modeling_nemotron_h",
    "transformers.models.falcon_h1.modeling_falcon_h1",
    "transformers.models.granitemoehybrid.modeling_granitemoehybrid",
    "transformers.models.zamba2.modeling_zamba2",
    # LFM2's short-conv layers call the same conv function (no scan): the conv gets per-sequence state too.
    "transformers.models.lfm2.modeling_lfm2",
    "transformers.models.lfm2_moe.modeling_lfm2_moe",
    # Gated delta-net layers (Qwen3-Next, Qwen3.5) convolve q/k/v with it before the delta rule.
    "transformers.models.qwen3_next.modeling_qwen3_next",
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe",
)


def causal_conv1d_fn(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    activation: str | None = None, **kwargs: Any,
) -> torch.Tensor:
    import ad_compiler.custom_ops  # noqa: F401 - registers torch_causal_conv1d
    from transformers.activations import ACT2FN

    out = torch.ops.auto_deploy.torch_causal_conv1d(hidden_states.transpose(1, 2), weight, bias).transpose(1, 2)
    return ACT2FN[activation](out) if activation is not None else out


def mamba2_chunk_scan(
    hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    chunk_size: int, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None, dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf), return_final_states: bool = False, z: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    import ad_compiler.custom_ops  # noqa: F401 - registers torch_ssm

    # The export path never carries state in or out; anything else is a mixer this patch does not know.
    if initial_states is not None or return_final_states or z is not None or not dt_softplus:
        raise RuntimeError("export patch hf_mamba2_ops: unexpected mamba2_chunk_scan call (state, z or no softplus)")
    h = hidden_states.shape[2]
    D = D if D is not None else hidden_states.new_zeros(h)
    dt_bias = dt_bias if dt_bias is not None else hidden_states.new_zeros(h)
    return torch.ops.auto_deploy.torch_ssm(
        hidden_states, dt, A, B, C, D, dt_bias, int(chunk_size), float(dt_limit[0]), float(dt_limit[1])
    )


@ExportPatchRegistry.register("hf_mamba2_ops")
def hf_mamba2_ops() -> AbstractContextManager[None]:
    replacements = {"causal_conv1d_fn": causal_conv1d_fn, "mamba2_chunk_scan": mamba2_chunk_scan}
    return swapped([(mod, attr, new) for mod in loaded(MIXER_MODULES) for attr, new in replacements.items()
                    if hasattr(mod, attr)])

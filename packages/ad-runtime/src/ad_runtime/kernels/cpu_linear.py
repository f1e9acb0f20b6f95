"""`auto_deploy::cpu_packed_linear`: a CPU linear that takes MKL on the dense weight for one row, oneDNN packed for more."""

import torch


@torch.library.custom_op("auto_deploy::cpu_packed_linear", mutates_args=())
def cpu_packed_linear(
    input: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """aten.linear(input, weight, bias), `packed` the same weight in oneDNN's blocked layout.

    One row (batch-1 decode) multiplies the dense weight (MKL's matrix-vector product); more rows run oneDNN on the
    packed one. On the 2-core development VM, SmolLM2's decode step took 42 ms with MKL against 52 with oneDNN at
    one row and 72-78 with oneDNN against 93-95 with MKL at eight (benchmarks/README.md, eleventh session).
    """
    if input.numel() == input.shape[-1]:
        return torch.ops.aten.linear.default(input, weight, bias)
    return torch.ops.mkldnn._linear_pointwise.default(input, packed, bias, "none", [], "")


@cpu_packed_linear.register_fake
def _cpu_packed_linear_fake(
    input: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))

"""Test helper: a Hugging Face causal LM wrapped to take (input_ids, position_ids) and return only its logits."""

import torch


class Logits(torch.nn.Module):
    """What the transform tests export: the model's logits, no KV cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

"""Fixtures for sharding tests: one exported tiny Llama per session (export is the slow part)."""

import pytest
import torch
from sharding_harness import example_inputs, export_hf
from transformers import LlamaConfig, LlamaForCausalLM

# 4 heads / 2 kv heads: tp splits heads at world size 2; at 4 the kv heads don't divide (simple fallback).
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="session")
def llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    inputs = example_inputs(LLAMA["vocab_size"])
    gm = export_hf(model, inputs)
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
    return gm, inputs, ref

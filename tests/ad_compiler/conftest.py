"""Shared fixtures of the compiler tests: tiny exported modules, a tiny HF checkpoint, one transform at a time."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ad_compiler.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from torch.fx import GraphModule

D = torch.export.Dim.DYNAMIC

# A Llama small enough to export in about a second; GQA (4 heads, 2 KV heads) like SmolLM2.
TINY_LLAMA = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
)


def export_module(module: torch.nn.Module, *args: torch.Tensor) -> GraphModule:
    """Export with dim 0 of every positional input dynamic (the pipeline's own export function)."""
    return torch_export_to_gm(module, args, dynamic_shapes=tuple({0: D} for _ in args), patch_list=[])


def run_transform(name: str, mod: Any, factory: Any = None, device: str = "cpu", **config: Any) -> tuple[Any, Any]:
    """Apply one transform through the real pipeline entry point; returns (module, its TransformInfo)."""
    opt = InferenceOptimizer(factory, {name: config})
    out = opt(mod=mod, shared_config=SharedConfig(device=device))
    return out, opt.history[name]


@pytest.fixture
def apply_transform() -> Callable[..., tuple[Any, Any]]:
    return run_transform


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama saved as a HF folder (config.json + model.safetensors), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama_dir: Path) -> torch.nn.Module:
    """The tiny Llama as HF loads it, eager attention, fp32: the numerical reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager", dtype=torch.float32).eval()


def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def example_batch(vocab: int, batch: int = 2, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "position_ids": torch.arange(seq).expand(batch, seq).contiguous(),
    }


@pytest.fixture(name="export_module")
def _export_module_fixture() -> Callable[..., GraphModule]:
    return export_module


@pytest.fixture(name="hf_logits")
def _hf_logits_fixture() -> Callable[..., torch.Tensor]:
    return hf_logits


@pytest.fixture(name="example_batch")
def _example_batch_fixture() -> Callable[..., dict[str, torch.Tensor]]:
    return example_batch

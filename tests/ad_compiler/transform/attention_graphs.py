"""Tiny random-weight HF models exported once per session, for the attention transform tests."""

import copy
import functools

import torch
import torch.nn as nn
from torch.fx import GraphModule
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import ad_compiler.custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformInfo, TransformRegistry
from hf_logits import Logits

N_HEADS, N_KV, HEAD_DIM, N_LAYERS, WINDOW = 4, 2, 16, 2, 3
# Large-ish init so attention patterns (window, soft-cap) visibly change the logits.
_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=N_HEADS,
    num_key_value_heads=N_KV, num_hidden_layers=N_LAYERS, head_dim=HEAD_DIM, initializer_range=0.2,
)  # fmt: skip


def build_hf(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=WINDOW))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_COMMON))
    elif family == "gemma2":
        # Soft-cap small enough to matter; layer 0 slides, layer 1 is global. Eager: sdpa cannot soft-cap.
        cfg = Gemma2Config(
            **_COMMON, sliding_window=WINDOW, attn_logit_softcapping=2.0, query_pre_attn_scalar=HEAD_DIM,
            final_logit_softcapping=None, attn_implementation="eager",
        )  # fmt: skip
        model = Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def example_inputs(batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    return {"input_ids": ids, "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}


@functools.cache
def _exported(family: str, patched: bool) -> GraphModule:
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn}}
    model = Logits(build_hf(family))
    # Unpatched, transformers hands attention an explicit mask built from position_ids and repeat_kv'd k/v.
    patch_list = None if patched else []
    return torch_export_to_gm(model, (), example_inputs(), dynamic_shapes=shapes, patch_list=patch_list)


def exported(family: str, patched: bool = True) -> GraphModule:
    """A private copy of the family's exported graph (export runs once per session and form)."""
    return copy.deepcopy(_exported(family, patched))


def apply(name: str, gm: GraphModule, **config) -> tuple[GraphModule, TransformInfo]:
    """Run transform `name` through the registry entry point, as the optimizer does."""
    history: dict[str, TransformInfo] = {}
    gm = TransformRegistry.get(name)(config or None)(gm, None, None, SharedConfig(), history)
    return gm, history[name]


def outputs(gm: GraphModule) -> list[torch.Tensor]:
    """Logits for two input shapes (the graph is dynamic in batch and sequence)."""
    with torch.no_grad():
        return [gm(**example_inputs(2, 8)), gm(**example_inputs(3, 6))]


def assert_same_outputs(ref: list[torch.Tensor], gm: GraphModule, atol: float = 1e-5) -> None:
    for r, o in zip(ref, outputs(gm), strict=True):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=atol)


torch_attention = torch.ops.auto_deploy.torch_attention
sdpa = torch.ops.aten.scaled_dot_product_attention


CHAIN = [
    "match_repeat_kv",
    "match_eager_attention",
    "match_sdpa_to_torch_attention",
    "match_grouped_attention",
    "match_attention_layout",
    "eliminate_redundant_transposes",
]


def run(names: list[str], gm: GraphModule) -> GraphModule:
    """Apply transforms in order with their default configs."""
    for name in names:
        gm, _ = apply(name, gm)
    return gm


def attention_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch_attention.default]


def hf_outputs(family: str) -> list[torch.Tensor]:
    """Hugging Face eager logits for the inputs `outputs` uses."""
    model = build_hf(family)
    with torch.no_grad():
        return [model(**example_inputs(*s), use_cache=False).logits for s in ((2, 8), (3, 6))]


def set_attention_arg(gm: GraphModule, index: int, value) -> None:
    """Overwrite one positional argument of every torch_attention (to show a test would notice)."""
    for n in attention_nodes(gm):
        args = list(n.args)
        args[index] = value
        n.args = tuple(args)
    gm.recompile()

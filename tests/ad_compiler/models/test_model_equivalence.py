"""Whole pipeline (up to post_load_fusion) against Hugging Face eager logits, fp32 on the CPU, per model family."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from ad_compiler.export.pipeline import compile_until, factory_from_args
from ad_compiler.transform.interface import SharedConfig
from ad_config import load_llm_args
from torch.fx import GraphModule

aten = torch.ops.aten
REL_TOL = 1e-4  # max |ours - HF| / max |HF|
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
# Per family: config class name, extra config, RMSNorms per layer (+1 final norm), MoE layers.
FAMILIES = {
    "llama": ("LlamaConfig", {}, 2, 0),
    "qwen2": ("Qwen2Config", {}, 2, 0),
    "qwen3": ("Qwen3Config", {}, 4, 0),  # q_norm, k_norm
    "mistral": ("MistralConfig", {"sliding_window": 4}, 2, 0),  # window shorter than the test sequence
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, 2, 2),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, 2, 0),
    "gemma2": ("Gemma2Config", {"sliding_window": 4, "query_pre_attn_scalar": 16}, 4, 0),  # soft-cap, window
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 4, "query_pre_attn_scalar": 16}, 6, 0),
}
# Mamba2-style families: config class, config, (mamba, attention, rope) layers. 8 heads x 16 = 2 x hidden 64,
# 2 groups, chunk 4 so the 9-token test sequence spans a partial last chunk.
MAMBA_FAMILIES = {
    # time_step_limit's finite max clamps some of the random init's dt (softplus(dt + dt_bias) ~ 0.001..0.1+).
    "mamba2": ("Mamba2Config", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16,
                                    state_size=16, n_groups=2, expand=2, chunk_size=4, conv_kernel=4,
                                    time_step_limit=(0.0, 0.05)), (2, 0, 0)),
    # Layers: mamba, attention (partial rotary), mamba.
    "bamba": ("BambaConfig", dict(SMALL, num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8,
                                  mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_expand=2,
                                  mamba_chunk_size=4, mamba_d_conv=4), (2, 1, 1)),
    # Layers: mamba, attention (no rotary), MLP; its mixer clamps dt below at time_step_min.
    "nemotron_h": ("NemotronHConfig", dict(SMALL, layers_block_type=["linear_attention", "full_attention", "mlp"],
                                           mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16,
                                           expand=2, chunk_size=4, conv_kernel=4), (1, 1, 0)),
}


def _compile(model: str | None, **kwargs) -> GraphModule:
    args = load_llm_args(model=model, device="cpu", dtype="float32", **kwargs)
    result = compile_until(factory_from_args(args), args.transforms, until="post_load_fusion",
                           shared_config=SharedConfig(device="cpu"), allow_unregistered=True)
    assert isinstance(result.module, GraphModule)
    return result.module


def _canonical_counts(gm: GraphModule) -> Counter:
    """auto_deploy ops by kind, whatever backend a fusion picked (torch_rmsnorm, triton_rmsnorm, ...)."""
    kinds: Counter = Counter()
    for n in gm.graph.nodes:
        name = str(n.target) if n.op == "call_function" else ""
        if name.startswith("auto_deploy."):
            for kind in ("attention", "rope", "rmsnorm", "moe", "ssm", "causal_conv1d"):
                if kind in name:
                    kinds[kind] += 1
    return kinds


def _leftovers(gm: GraphModule) -> dict[str, int]:
    """Eager subgraphs that matchers should have replaced (attention softmax/sdpa, rotate-half, norm rsqrt)."""
    ops = {"sdpa": aten.scaled_dot_product_attention, "softmax": aten._softmax, "softmax_int": aten.softmax,
           "rsqrt": aten.rsqrt, "neg": aten.neg}
    counts = {k: sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in set(
        getattr(op, o) for o in op.overloads())) for k, op in ops.items()}
    return {k: v for k, v in counts.items() if v}


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    rel = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert rel < REL_TOL, f"max abs diff is {rel:.2e} of the logit scale"


def _inputs(vocab: int, batch: int = 2, seq: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
            "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}


def _hf_logits(folder: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.fixture(scope="session")
def smollm2_compiled() -> GraphModule:
    """The bundled SmolLM2 through the whole compiler once per session (real weights)."""
    return _compile(None)


@pytest.mark.slow
def test_smollm2_matches_hf(smollm2_compiled):
    from ad_compiler.models.bundled import bundled_model_dir

    gm = smollm2_compiled
    counts = _canonical_counts(gm)
    assert (counts["attention"], counts["rope"], counts["rmsnorm"]) == (30, 30, 61), counts
    assert not _leftovers(gm)
    inputs = _inputs(49152)
    with torch.no_grad():
        _assert_close(gm(**inputs), _hf_logits(bundled_model_dir(), inputs))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_family_matches_hf(family, tmp_path):
    import transformers

    cls_name, extra, norms_per_layer, moe_layers = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**SMALL, **extra})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.save_pretrained(tmp_path)
    gm = _compile(str(tmp_path))
    n = SMALL["num_hidden_layers"]
    counts = _canonical_counts(gm)
    assert counts["attention"] == n and counts["rope"] == n, counts
    assert counts["rmsnorm"] == norms_per_layer * n + 1, counts
    assert counts["moe"] == moe_layers, counts
    left = _leftovers(gm)
    if moe_layers and left.get("softmax_int") == moe_layers:
        del left["softmax_int"]  # the router's softmax over experts feeds torch_moe; it is not attention
    assert not left, left
    inputs = _inputs(SMALL["vocab_size"])
    with torch.no_grad():
        _assert_close(gm(**inputs), _hf_logits(tmp_path, inputs))


@pytest.mark.parametrize("family", sorted(MAMBA_FAMILIES))
def test_random_mamba_family_matches_hf(family, tmp_path):
    import transformers

    cls_name, cfg, (mamba, attention, rope) = MAMBA_FAMILIES[family]
    config = getattr(transformers, cls_name)(**cfg)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    gm = _compile(str(tmp_path))
    counts = _canonical_counts(gm)
    # One scan and one conv per mixer, through the hf_mamba2_ops export patch: no reference conv or scan left.
    assert (counts["ssm"], counts["causal_conv1d"]) == (mamba, mamba), counts
    assert (counts["attention"], counts["rope"]) == (attention, rope), counts
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        aten.conv1d.default, aten.conv1d.padding, aten.convolution.default)]
    assert not convs, convs
    left = _leftovers(gm)
    assert not {k: v for k, v in left.items() if k in ("sdpa", "softmax", "softmax_int")}, left
    inputs = _inputs(cfg["vocab_size"])
    with torch.no_grad():
        _assert_close(gm(**inputs), _hf_logits(tmp_path, inputs))

"""build_model: the factory's model on meta, parameter names equal to the checkpoint's keys."""

import torch
from ad_compiler.models.factory import ModelFactoryRegistry
from safetensors.torch import load_file


def test_builds_on_meta_with_checkpoint_keys(tiny_llama_dir, apply_transform):
    factory = ModelFactoryRegistry.get("AutoModelForCausalLM")(model=str(tiny_llama_dir))
    mod, info = apply_transform("build_model", torch.nn.Module(), factory=factory)
    assert info.num_matches == 1 and not info.skipped
    assert all(p.device.type == "meta" for p in mod.parameters())
    ckpt_keys = set(load_file(str(tiny_llama_dir / "model.safetensors")))
    assert set(mod.state_dict()) == ckpt_keys
    assert "model.layers.0.self_attn.q_proj.weight" in ckpt_keys and "lm_head.weight" in ckpt_keys
    assert mod.config._attn_implementation == "sdpa"

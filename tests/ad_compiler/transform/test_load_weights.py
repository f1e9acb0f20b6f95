"""load_weights: checkpoint values land on the device through load_state_dict (hooks see full tensors)."""

import json

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactoryRegistry
from safetensors.torch import load_file, save_file


def _exported(folder, apply_transform, **kw):
    factory = ModelFactoryRegistry.get("AutoModelForCausalLM")(model=str(folder), **kw)
    mod, _ = apply_transform("build_model", torch.nn.Module(), factory=factory)
    gm, _ = apply_transform("export_to_gm", mod, factory=factory)
    return gm, factory


def test_loads_checkpoint(tiny_llama_dir, tiny_llama_hf, apply_transform, hf_logits, example_batch):
    gm, factory = _exported(tiny_llama_dir, apply_transform)
    gm, info = apply_transform("load_weights", gm, factory=factory)
    assert info.num_matches == 1
    assert not any(t.device.type == "meta" for t in [*gm.parameters(), *gm.buffers()])
    ref = tiny_llama_hf.state_dict()
    for k, v in gm.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    inputs = example_batch(256)
    torch.testing.assert_close(gm(**inputs), hf_logits(tiny_llama_hf, **inputs), atol=1e-5, rtol=1e-5)


def test_load_hooks_slice_full_tensors(tiny_llama_dir, apply_transform):
    gm, factory = _exported(tiny_llama_dir, apply_transform)
    seen = {}

    def keep_first_half(state_dict, prefix, *args):
        # What a column-sharding hook does: the full tensor arrives, this rank keeps its rows.
        key = prefix + "model.layers.0.mlp.gate_proj.weight"
        if key in state_dict:
            seen[key] = tuple(state_dict[key].shape)
            state_dict[key] = state_dict[key][: state_dict[key].shape[0] // 2]

    # As after the sharding executor: the meta parameter already has this rank's shape.
    gate = gm.get_submodule("model.layers.0.mlp.gate_proj")
    gate._parameters["weight"] = torch.nn.Parameter(torch.empty(64, 64, device="meta"), requires_grad=False)
    gm._register_load_state_dict_pre_hook(keep_first_half)
    gm, _ = apply_transform("load_weights", gm, factory=factory)
    full = load_file(str(tiny_llama_dir / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert seen["model.layers.0.mlp.gate_proj.weight"] == tuple(full.shape)
    torch.testing.assert_close(gm.get_parameter("model.layers.0.mlp.gate_proj.weight"), full[: full.shape[0] // 2])


def test_missing_weights_are_named(tiny_llama_dir, tmp_path, apply_transform):
    for f in tiny_llama_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    gm, factory = _exported(tmp_path, apply_transform)
    with pytest.raises(CompileError, match="lacks 1 weights.*model.norm.weight"):
        apply_transform("load_weights", gm, factory=factory)


def test_random_init_is_seeded(tiny_llama_dir, apply_transform, example_batch):
    outs = []
    for seed in (0, 0, 1):
        gm, factory = _exported(tiny_llama_dir, apply_transform, skip_loading_weights=True, seed=seed)
        gm, _ = apply_transform("load_weights", gm, factory=factory)
        outs.append(gm(**example_batch(256)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize(("model_type", "key", "expected"), [
    ("nemotron_h", "backbone.layers.0.mixer.A_log", "model.layers.0.mixer.A_log"),  # its checkpoints say backbone.*
    ("nemotron_h", "lm_head.weight", "lm_head.weight"),
    ("llama", "model.norm.weight", "model.norm.weight"),  # no renames for this type
    ("gpt_neox:GPTNeoXForCausalLM", "embed_out.weight", "lm_head.weight"),  # registered by architecture class
    ("gpt_neox:GPTNeoXForCausalLM", "gpt_neox.embed_in.weight", "gpt_neox.embed_in.weight"),
])
def test_checkpoint_keys_follow_transformers_renames(tmp_path, model_type, key, expected):
    from ad_compiler.models.weights import checkpoint_renamer

    model_type, _, architecture = model_type.partition(":")
    config = {"model_type": model_type, **({"architectures": [architecture]} if architecture else {})}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert checkpoint_renamer(tmp_path)(key) == expected
    assert checkpoint_renamer(tmp_path / "no_such_folder")(key) == key


def test_multimodal_checkpoint_keys_map_to_the_text_model(tmp_path):
    """Qwen3.5 checkpoints are multimodal: the text model sits under model.language_model (its text type's renames)."""
    from ad_compiler.models.weights import checkpoint_renamer

    config = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
              "text_config": {"model_type": "qwen3_5_text"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    rename = checkpoint_renamer(tmp_path)
    assert rename("model.language_model.layers.0.linear_attn.A_log") == "model.layers.0.linear_attn.A_log"
    assert rename("lm_head.weight") == "lm_head.weight"

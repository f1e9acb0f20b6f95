"""AutoModelForCausalLM factory: model sources, config overrides, dtype, tokenizer, sharding config."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.models.bundled import bundled_gguf_path, bundled_model_dir, convert_gguf
from ad_compiler.models.factory import ModelFactoryRegistry

Factory = ModelFactoryRegistry.get("AutoModelForCausalLM")


def test_registered():
    assert "AutoModelForCausalLM" in ModelFactoryRegistry.names()


def test_bundled_default_and_gguf_file_share_the_cache():
    assert bundled_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder = bundled_model_dir()
    assert Factory(None).folder == folder
    assert Factory(str(bundled_gguf_path())).folder == folder  # a .gguf path converts once, to the same folder
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    cfg = Factory(None).config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)


def test_conversion_is_keyed_by_file(tmp_path):
    from ad_compiler.models import bundled

    assert bundled._cache_key(bundled_gguf_path()) in str(bundled_model_dir())
    # An already converted folder is returned without touching transformers.
    target = tmp_path / bundled._cache_key(bundled_gguf_path())
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    assert convert_gguf(bundled_gguf_path(), cache_dir=tmp_path) == target


def test_conversion_reads_the_file_once_and_restores_gguf():
    import gguf
    from ad_compiler.models import bundled

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with bundled._gguf_read_once():
        first = gguf.GGUFReader(bundled_gguf_path())
        assert gguf.GGUFReader(str(bundled_gguf_path())) is first and isinstance(first, real_reader)
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf.get_tensor_name_map(arch, 30) is gguf.get_tensor_name_map(arch, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (real_reader, real_map)


def test_model_kwargs_merge_recursively(tiny_llama_dir):
    f = Factory(str(tiny_llama_dir), model_kwargs={"num_hidden_layers": 1, "rope_parameters": {"rope_theta": 5000.0}})
    assert f.config.num_hidden_layers == 1
    assert f.config.rope_parameters["rope_theta"] == 5000.0
    assert f.config.rope_parameters["rope_type"] == "default"  # merged, not replaced
    assert len(f.build_model("meta").model.layers) == 1


def test_model_kwargs_nested_sub_config(tmp_path):
    from transformers import Gemma3Config

    Gemma3Config(text_config={"num_hidden_layers": 4, "sliding_window": 8}).save_pretrained(tmp_path)
    f = Factory(str(tmp_path), model_kwargs={"text_config": {"num_hidden_layers": 2}})
    text = f.config.text_config
    assert text.num_hidden_layers == 2 and text.sliding_window == 8
    assert len(text.layer_types) == 2


def test_unknown_model_kwarg_is_an_error(tiny_llama_dir):
    with pytest.raises(CompileError, match="num_hiden_layers.*did you mean 'num_hidden_layers'"):
        Factory(str(tiny_llama_dir), model_kwargs={"num_hiden_layers": 1}).config


def test_dtype_rules(tiny_llama_dir):
    assert Factory(str(tiny_llama_dir)).torch_dtype == torch.float32  # checkpoint dtype
    assert Factory(str(tiny_llama_dir), dtype="bfloat16").torch_dtype == torch.bfloat16
    f = Factory(str(tiny_llama_dir), dtype="bfloat16")
    assert next(f.build_model("meta").parameters()).dtype == torch.bfloat16
    with pytest.raises(CompileError, match="unknown dtype"):
        Factory(str(tiny_llama_dir), dtype="float7").torch_dtype


def test_missing_sources_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CompileError, match="does not exist"):
        Factory(str(tmp_path / "x.gguf")).folder
    with pytest.raises(CompileError, match="no config.json"):
        Factory(str(tmp_path)).folder
    with pytest.raises(CompileError, match="could not get model 'nobody/no-such-model'"):
        Factory("nobody/no-such-model").folder


def test_tokenizer_and_skip(tiny_llama_dir):
    assert Factory(None).init_tokenizer().encode("Paris")
    assert Factory(None, skip_tokenizer_init=True).init_tokenizer() is None


def test_sharding_config_and_example_inputs(tiny_llama_dir):
    f = Factory(str(tiny_llama_dir))
    sc = f.get_sharding_config()
    assert sc["head_dim"] == 16
    assert sc["tp_plan"]["layers.*.self_attn.q_proj"] == "colwise"
    ex = f.get_example_inputs()
    assert set(ex) == {"input_ids", "position_ids"} and ex["input_ids"].shape == ex["position_ids"].shape


def test_tied_embeddings_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ad_compiler.export import torch_export_to_gm

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path)
    f = Factory(str(tmp_path))
    assert f.tied_weights() == {"lm_head.weight": "model.embed_tokens.weight"}
    gm = torch_export_to_gm(f.build_model("meta"), kwargs={k: v.to("meta") for k, v in f.get_example_inputs().items()})
    f.load_or_random_init(gm, "cpu")
    torch.testing.assert_close(gm.get_parameter("lm_head.weight"), hf.model.embed_tokens.weight)


def test_per_expert_checkpoint_loads_into_stacked_experts(tmp_path):
    from transformers import AutoModelForCausalLM, MixtralConfig
    from safetensors import safe_open

    from ad_compiler.export import torch_export_to_gm
    from ad_compiler.export.devices import retarget_device_constants

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert any(".block_sparse_moe.experts.0.w1." in k for k in f.keys())  # transformers saves the legacy layout
    f = Factory(str(tmp_path))
    gm = torch_export_to_gm(f.build_model("meta"), kwargs={k: v.to("meta") for k, v in f.get_example_inputs().items()})
    f.load_or_random_init(gm, "cpu")
    retarget_device_constants(gm, "cpu")
    torch.testing.assert_close(gm.get_parameter("model.layers.0.mlp.experts.gate_up_proj"),
                               hf.model.layers[0].mlp.experts.gate_up_proj)
    ids, pos = torch.randint(0, 64, (2, 5)), torch.arange(5).expand(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, position_ids=pos),
                                   hf(input_ids=ids, position_ids=pos, use_cache=False).logits, atol=1e-5, rtol=1e-5)


def test_tensors_of_dropped_layers_are_ignored_quietly_others_with_a_warning(tiny_llama_dir, tmp_path, caplog):
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from ad_compiler.export import torch_export_to_gm

    def load(folder) -> list[logging.LogRecord]:
        f = Factory(str(folder), model_kwargs={"num_hidden_layers": 1})
        gm = torch_export_to_gm(f.build_model("meta"),
                                kwargs={k: v.to("meta") for k, v in f.get_example_inputs().items()})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ad_compiler.models.weights"):
            f.load_or_random_init(gm, "cpu")
        return [r for r in caplog.records if "ignored" in r.getMessage()]

    [dropped] = load(tiny_llama_dir)  # layer 1's tensors: the model was asked for one layer
    assert dropped.levelno == logging.INFO and "model.layers.1." in dropped.getMessage()
    odd = tmp_path / "odd"
    shutil.copytree(tiny_llama_dir, odd)
    sd = load_file(str(odd / "model.safetensors"))
    sd["model.mystery.weight"] = torch.zeros(2)
    save_file(sd, str(odd / "model.safetensors"))
    [foreign] = load(odd)  # a tensor nobody can place: may be a naming mismatch, so a warning
    assert foreign.levelno == logging.WARNING

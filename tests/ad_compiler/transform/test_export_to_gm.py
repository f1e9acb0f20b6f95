"""export_to_gm: dynamic batch/seq graph of aten ops, HF keys, meta params, patches applied and reverted."""

import pytest
import torch
from ad_compiler.models.factory import ModelFactoryRegistry
from ad_compiler.utils.graph_utils import count_op, nodes_calling
from torch.fx import GraphModule

aten = torch.ops.aten




def _factory(folder, **kw):
    return ModelFactoryRegistry.get("AutoModelForCausalLM")(model=str(folder), **kw)


def _export(factory, apply_transform, **cfg):
    mod, _ = apply_transform("build_model", torch.nn.Module(), factory=factory)
    return apply_transform("export_to_gm", mod, factory=factory, **cfg)


def test_export_graph_contract(tiny_llama_dir, tiny_llama_hf, apply_transform, hf_logits, example_batch):
    from transformers import masking_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    mask_before = masking_utils.create_causal_mask
    factory = _factory(tiny_llama_dir)
    gm, info = _export(factory, apply_transform)
    assert isinstance(gm, GraphModule) and info.num_matches == 1
    # Patches are reverted after export.
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before and masking_utils.create_causal_mask is mask_before
    # Keys are the checkpoint's; parameters wait on meta for load_weights.
    assert set(gm.state_dict()) == set(tiny_llama_hf.state_dict())
    assert all(p.device.type == "meta" for p in gm.parameters())
    # Attention: one plain causal sdpa per layer, no mask, no packed-sequence detection subgraph.
    sdpa = nodes_calling(gm, aten.scaled_dot_product_attention)
    assert len(sdpa) == 2
    for n in sdpa:
        assert n.args[3] is None and n.args[5] is True and n.kwargs.get("enable_gqa") is True
    assert count_op(gm, [aten.diff, aten.cumsum]) == 0
    assert not any("wrap_with" in str(n.target) for n in gm.graph.nodes)
    # After loading, batch and sequence are dynamic and logits equal HF's.
    factory.load_or_random_init(gm, "cpu")
    from ad_compiler.export.devices import retarget_device_constants

    retarget_device_constants(gm, "cpu")
    for batch, seq in [(2, 6), (3, 11), (1, 2)]:
        inputs = example_batch(256, batch, seq)
        torch.testing.assert_close(gm(**inputs), hf_logits(tiny_llama_hf, **inputs), atol=1e-5, rtol=1e-5)


def test_no_patches_keeps_hf_mask(tiny_llama_dir, apply_transform):
    gm, _ = _export(_factory(tiny_llama_dir), apply_transform, patch_list=[])
    sdpa = nodes_calling(gm, aten.scaled_dot_product_attention)
    # Without the patches transformers 5 derives a mask from position_ids and hands it to sdpa.
    assert any(n.args[3] is not None for n in sdpa)


def test_sliding_window_recorded(tmp_path, apply_transform):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    gm, _ = _export(_factory(tmp_path, skip_loading_weights=True), apply_transform)
    (sdpa,) = nodes_calling(gm, aten.scaled_dot_product_attention)
    assert sdpa.args[3] is None
    assert sdpa.meta["custom"]["sliding_window"] == 5


def test_unknown_patch_is_an_error(tiny_llama_dir, apply_transform):
    from ad_compiler.errors import CompileError

    with pytest.raises(CompileError, match="unknown export patch 'nope'"):
        _export(_factory(tiny_llama_dir), apply_transform, patch_list=["nope"])

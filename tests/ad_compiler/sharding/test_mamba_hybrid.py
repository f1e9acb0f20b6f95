"""A hybrid Mamba2 + attention model (Bamba) with the spec page's manual tp_plan on gloo ranks."""

import pytest
import torch
from sharding_harness import assert_shards_are_one_nth, example_inputs, export_hf, run_ranks
from transformers import BambaConfig, BambaForCausalLM

# Sizes chosen so heads (8), groups (4) and attention heads (8/4 kv) divide world sizes 2 and 4.
BAMBA = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=12, mamba_n_groups=4,
             mamba_d_state=6, mamba_expand=2, mamba_chunk_size=10, mamba_d_conv=4)
SPEC_PLAN = {"in_proj": "mamba", "out_proj": "rowwise", "q_proj": "colwise", "k_proj": "colwise",
             "v_proj": "colwise", "o_proj": "rowwise", "gate_proj": "colwise", "up_proj": "colwise",
             "down_proj": "rowwise"}


@pytest.fixture(scope="module")
def bamba():
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**BAMBA))
    inputs = example_inputs(BAMBA["vocab_size"], batch=2, seq=12)
    gm = export_hf(model, inputs, dynamic=False)
    with torch.no_grad():
        ref = model(**inputs, use_cache=False).logits
    return gm, inputs, ref


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_bamba_manual_plan_matches(bamba, world: int) -> None:
    gm, inputs, ref = bamba
    detect = {"sharding_source": ["manual"], "manual_config": {"head_dim": 6, "tp_plan": SPEC_PLAN}}
    results = run_ranks(gm, inputs, world, detect=detect)
    for r in results:
        torch.testing.assert_close(r["logits"], ref, rtol=1e-4, atol=1e-5)
        assert_shards_are_one_nth(r, world)
    kinds = results[0]["kinds"]
    assert kinds["model.layers.0.mamba.in_proj"] == "mamba" and kinds["model.layers.0.mamba.out_proj"] == "row"
    assert kinds["model.layers.1.self_attn.q_proj"] == "column"
    # conv, A_log, D, dt_bias and the gated norm are split with the mixer.
    sharded = set(results[0]["bytes"])
    for name in ("conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight"):
        assert f"model.layers.0.mamba.{name}" in sharded


def test_bamba_heuristic_ssm_plan(bamba) -> None:
    from ad_compiler.sharding.plan import PLAN_META_KEY
    from sharding_harness import detect_only

    gm, _, _ = bamba
    plan = detect_only(gm, 0, 2, {"sharding_dims": ["ssm", "tp"]}).meta.pop(PLAN_META_KEY)
    kinds = {e.module: e.kind.value for e in plan.entries.values()}
    assert kinds["model.layers.0.mamba.in_proj"] == "mamba" and kinds["model.layers.0.mamba.out_proj"] == "row"
    assert kinds["model.layers.1.self_attn.o_proj"] == "row"

"""Llama under tensor parallelism on gloo ranks: logits equal world size 1; shards are 1/N of each weight."""

import pytest
import torch
from sharding_harness import assert_shards_are_one_nth, run_ranks


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("on_meta", [False, True], ids=["cpu_weights", "meta_then_load"])
def test_llama_logits_match_single_rank(llama, world: int, on_meta: bool) -> None:
    gm, inputs, ref = llama
    results = run_ranks(gm, inputs, world, on_meta=on_meta)
    for r in results:
        torch.testing.assert_close(r["logits"], ref, rtol=1e-5, atol=1e-5)
        assert_shards_are_one_nth(r, world)
    kinds = results[0]["kinds"]
    assert kinds["model.layers.1.mlp.down_proj"] == "row"
    # Heads 4/2: tp at world 2; at world 4 the kv heads don't divide and attention falls back to simple.
    assert kinds["model.layers.0.self_attn.q_proj"] == ("column" if world == 2 else "simple")


def test_llama_simple_shard_only_matches(llama) -> None:
    gm, inputs, ref = llama
    results = run_ranks(gm, inputs, 2, detect={"simple_shard_only": True})
    torch.testing.assert_close(results[1]["logits"], ref, rtol=1e-5, atol=1e-5)
    assert set(results[1]["kinds"].values()) == {"simple"}
    assert_shards_are_one_nth(results[1], 2)


def test_llama_manual_plan_with_gather_matches(llama) -> None:
    gm, inputs, ref = llama
    detect = {"sharding_source": ["manual"], "manual_config": {"tp_plan": {
        "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
        "mlp.*_proj": "gather", "lm_head": "gather"}}}
    results = run_ranks(gm, inputs, 2, detect=detect)
    torch.testing.assert_close(results[0]["logits"], ref, rtol=1e-5, atol=1e-5)
    kinds = results[0]["kinds"]
    assert kinds["model.layers.0.self_attn.o_proj"] == "row" and kinds["lm_head"] == "simple"
    assert kinds["model.layers.0.mlp.up_proj"] == "simple"

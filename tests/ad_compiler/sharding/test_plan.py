"""Detected plans: heuristic Llama plan, source order, partial configs, simple_shard_only, printing."""

import logging

import pytest
from ad_compiler.sharding.plan import PLAN_META_KEY, ShardingPlan, ShardSpec
from sharding_harness import detect_only
from torch.fx import GraphModule

import torch

COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
ROW = {"o_proj", "down_proj"}
MLP_ONLY = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
FULL = {**MLP_ONLY, "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}


class _Factory:
    """Stands in for a model factory: hands out the HF config's base_model_tp_plan."""

    def __init__(self, plan: dict[str, str]):
        self.plan = plan

    def get_sharding_config(self) -> dict[str, str]:
        return dict(self.plan)


def _plan(gm: GraphModule, world: int = 2, factory=None, **detect) -> ShardingPlan:
    # detect_sharding leaves the graph alone, so one exported graph serves every case.
    return detect_only(gm, 0, world, detect, factory).meta.pop(PLAN_META_KEY)


def _by_leaf(plan: ShardingPlan) -> dict[str, tuple[str, str]]:
    out = {}
    for e in plan.entries.values():
        out.setdefault(e.module.rsplit(".", 1)[-1], set()).add((e.kind.value, e.source))
    return {k: v.pop() if len(v) == 1 else tuple(sorted(v)) for k, v in out.items()}


def test_heuristic_llama_plan(llama) -> None:
    plan = _plan(llama[0])
    leaf = _by_leaf(plan)
    assert {k for k, (kind, _) in leaf.items() if kind == "column"} == COLUMN
    assert {k for k, (kind, _) in leaf.items() if kind == "row"} == ROW
    assert "lm_head" not in leaf  # outside every residual region: replicated
    assert len(plan) == 14 and "column" in str(plan) and "heuristic" in str(plan)


def test_factory_plan_from_hf_tp_plan(llama) -> None:
    from transformers import LlamaConfig

    plan = _plan(llama[0], factory=_Factory(LlamaConfig.base_model_tp_plan), sharding_source=["factory"])
    assert set(_by_leaf(plan).values()) == {("column", "factory"), ("row", "factory")}
    assert len(plan) == 14


@pytest.mark.parametrize("order", [["manual", "factory", "heuristic"], ["factory", "manual", "heuristic"],
                                   ["heuristic", "manual", "factory"]])
def test_first_source_wins(llama, order: list[str]) -> None:
    # manual says gather for the MLP, the factory says colwise/rowwise: who wins depends on the order.
    manual = {"tp_plan": {k: "gather" for k in MLP_ONLY}}
    plan = _plan(llama[0], factory=_Factory(MLP_ONLY), sharding_source=order, manual_config=manual)
    leaf = _by_leaf(plan)
    first = order[0]
    expect = {"manual": ("simple", "manual"), "factory": ("column", "factory"), "heuristic": ("column", "heuristic")}
    assert leaf["gate_proj"] == expect[first]
    assert leaf["q_proj"] == ("column", "heuristic")  # only the heuristic covers attention


def test_partial_config_true_leaves_rest_to_heuristic(llama) -> None:
    plan = _plan(llama[0], manual_config={"tp_plan": MLP_ONLY})
    leaf = _by_leaf(plan)
    assert leaf["down_proj"] == ("row", "manual") and leaf["o_proj"] == ("row", "heuristic")


def test_partial_config_true_without_heuristic_leaves_rest_unsharded(llama) -> None:
    plan = _plan(llama[0], sharding_source=["manual"], manual_config={"tp_plan": MLP_ONLY})
    assert set(_by_leaf(plan)) == {"gate_proj", "up_proj", "down_proj"}


def test_partial_config_false_discards_partial_plan(llama, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        plan = _plan(llama[0], sharding_source=["manual"], support_partial_config=False,
                     manual_config={"tp_plan": MLP_ONLY})
    assert len(plan) == 0 and "support_partial_config is false" in caplog.text
    full = _plan(llama[0], sharding_source=["manual"], support_partial_config=False, manual_config={"tp_plan": FULL})
    assert len(full) == 14


def test_simple_shard_only(llama) -> None:
    plan = _plan(llama[0], simple_shard_only=True)
    assert {e.kind.value for e in plan.entries.values()} == {"simple"}
    assert len(plan) == 15  # every linear, lm_head included


def test_heads_that_do_not_divide_fall_back_to_simple(llama) -> None:
    leaf = _by_leaf(_plan(llama[0], world=4))
    assert leaf["q_proj"] == ("simple", "heuristic") and leaf["o_proj"] == ("simple", "heuristic")
    assert leaf["gate_proj"] == ("column", "heuristic")


def test_world_size_one_is_no_plan(llama) -> None:
    assert len(_plan(llama[0], world=1)) == 0


def test_shard_spec_splits_each_chunk() -> None:
    full = torch.arange(12.0)
    spec = ShardSpec(0, (4, 8), rank=1, world_size=2)
    assert spec.slice(full).tolist() == [2.0, 3.0, 8.0, 9.0, 10.0, 11.0]

"""SmolLM2 (real weights, 4 layers) through the real pipeline on gloo ranks vs one rank; its detected plans."""

from typing import Any

import pytest
import torch
from ad_compiler.distributed import RankContext, launch
from ad_compiler.export.pipeline import compile_until, factory_from_args
from ad_compiler.sharding.plan import PLAN_META_KEY
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_config import load_llm_args

pytestmark = pytest.mark.slow

# 9 query heads, 3 KV heads, intermediate 1536: heads divide by 3 but not by 2.
ARGS = dict(device="cpu", dtype="float32", model_kwargs={"num_hidden_layers": 4})
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _compile(rank: int, world: int, sources: list[str] | None = None) -> dict[str, Any]:
    """Factory -> export -> ... -> sharding -> load -> fuse, as the runtime does it, then one full forward."""
    extra = {"transforms": {"detect_sharding": {"sharding_source": sources}}} if sources else {}
    args = load_llm_args(**ARGS, **extra)
    torch.manual_seed(0)
    result = compile_until(factory_from_args(args, device="cpu"), args.transforms, until="post_load_fusion",
                           shared_config=SharedConfig(local_rank=rank, world_size=world, device="cpu"))
    gm = result.module
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49152, (2, 11), generator=g)
    pos = torch.arange(11)[None].expand(2, 11).contiguous()
    with torch.no_grad():
        logits = gm(input_ids=ids, position_ids=pos)
    plan = gm.meta.get(PLAN_META_KEY)
    return {
        "logits": logits,
        "kinds": {e.module: e.kind.value for e in plan.entries.values()} if plan is not None else {},
        "proj_bytes": sum(p.numel() * p.element_size() for n, p in gm.named_parameters() if "proj" in n),
        "fused": [n for n, _ in gm.named_parameters() if "fused" in n],
        "fuse_gemms_matches": result.history["fuse_gemms"].num_matches,
    }


def _rank(ctx: RankContext, sources: list[str] | None) -> dict[str, Any]:
    return _compile(ctx.rank, ctx.world_size, sources)


@pytest.fixture(scope="module")
def single() -> dict[str, Any]:
    return _compile(0, 1)


def _kinds_by_leaf(kinds: dict[str, str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for module, kind in kinds.items():
        out.setdefault(module.rsplit(".", 1)[-1], set()).add(kind)
    return out


def _expected_attention(world: int) -> tuple[set[str], set[str]]:
    """(q/k/v kinds, o kinds): heads split only where 9 query and 3 KV heads both divide."""
    return ({"column"}, {"row"}) if world == 3 else ({"simple"}, {"simple"})


@pytest.fixture(scope="module")
def exported() -> tuple[Any, Any]:
    """The graph after pattern matching (canonical torch_attention in bsnd), weights still on meta."""
    args = load_llm_args(**ARGS, skip_loading_weights=True)
    factory = factory_from_args(args, device="cpu")
    return compile_until(factory, args.transforms, until="pattern_matcher").module, factory


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("sources", [["manual", "factory", "heuristic"], ["heuristic"]], ids=["default", "heuristic"])
def test_detected_plan(exported: tuple[Any, Any], world: int, sources: list[str]) -> None:
    gm, factory = exported
    detect = {"detect_sharding": {"sharding_source": sources}}
    InferenceOptimizer(factory, detect)(mod=gm, shared_config=SharedConfig(local_rank=0, world_size=world))
    plan = gm.meta.pop(PLAN_META_KEY)  # detection leaves the graph alone: the next case reuses it
    # The default order reaches the model config's own base_model_tp_plan first; it covers every layer.
    assert {e.source for e in plan.entries.values()} == {sources[0] if sources[0] != "manual" else "factory"}
    leaf = _kinds_by_leaf({e.module: e.kind.value for e in plan.entries.values()})
    qkv, o = _expected_attention(world)
    assert leaf["q_proj"] == leaf["k_proj"] == leaf["v_proj"] == qkv and leaf["o_proj"] == o
    assert leaf["gate_proj"] == leaf["up_proj"] == {"column"} and leaf["down_proj"] == {"row"}
    assert set(leaf) == set(PROJ) and len(plan) == 4 * len(PROJ)  # lm_head and embedding replicated


@pytest.mark.parametrize(("world", "sources"), [(2, None), (3, None), (3, ["heuristic"])],
                         ids=["world2", "world3", "world3-heuristic"])
def test_sharded_smollm2_logits_equal_one_rank(single: dict[str, Any], world: int, sources: list[str] | None) -> None:
    ranks = launch(_rank, world, (sources,), backend="gloo", start_method="fork", timeout_s=600)
    for r in ranks:
        torch.testing.assert_close(r["logits"], single["logits"], rtol=1e-4, atol=1e-4)
        # Every q/k/v/o/gate/up/down weight is split (column, row or simple), so each rank holds 1/N of them.
        assert r["proj_bytes"] * world == single["proj_bytes"]
        # Fusion ran after loading on the local shards: q/k/v and gate/up of each of the 4 layers.
        assert r["fuse_gemms_matches"] == single["fuse_gemms_matches"] == 8
        assert len(r["fused"]) == 8
    # World 3 splits heads (q/k/v column, o row); at 2 they don't divide and attention is split + all-gathered.
    leaf = _kinds_by_leaf(ranks[0]["kinds"])
    qkv, o = _expected_attention(world)
    assert leaf["q_proj"] == leaf["k_proj"] == leaf["v_proj"] == qkv and leaf["o_proj"] == o
    assert leaf["gate_proj"] == leaf["up_proj"] == {"column"} and leaf["down_proj"] == {"row"}
    assert set(leaf) == set(PROJ) and len(ranks[0]["kinds"]) == 4 * len(PROJ)

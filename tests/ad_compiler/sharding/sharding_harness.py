"""Helpers for sharding tests: export HF-style models, run sharded ranks with gloo, collect their results."""

from typing import Any

import torch
import torch.nn as nn
from ad_compiler.distributed import RankContext, launch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.sharding.load_hooks import shard_specs
from ad_compiler.sharding.plan import PLAN_META_KEY
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import run_shape_prop
from torch.fx import GraphModule

D = torch.export.Dim.DYNAMIC


class Logits(nn.Module):
    """forward(input_ids, position_ids) -> logits, keeping the HF model's state-dict keys."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_hf", model)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self._hf(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def example_inputs(vocab: int, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "position_ids": torch.arange(seq)[None].expand(batch, seq).contiguous()}


def export_hf(model: nn.Module, inputs: dict[str, torch.Tensor], dynamic: bool = True) -> GraphModule:
    shapes = {k: {0: D, 1: D} for k in inputs} if dynamic else None
    gm = torch_export_to_gm(Logits(model.eval()), kwargs=inputs, dynamic_shapes=shapes)
    return run_shape_prop(gm)


def shard_graph(gm: GraphModule, rank: int, world: int, detect: dict | None = None, factory: Any = None) -> GraphModule:
    """detect_sharding + sharding_transform_executor through the real pipeline entry point."""
    transforms = {"detect_sharding": detect or {}, "sharding_transform_executor": {}}
    shared = SharedConfig(local_rank=rank, world_size=world)
    return InferenceOptimizer(factory, transforms)(mod=gm, shared_config=shared)


def detect_only(gm: GraphModule, rank: int, world: int, detect: dict | None = None, factory: Any = None) -> GraphModule:
    shared = SharedConfig(local_rank=rank, world_size=world)
    return InferenceOptimizer(factory, {"detect_sharding": detect or {}})(mod=gm, shared_config=shared)


def execute_only(gm: GraphModule, rank: int, world: int) -> GraphModule:
    # Shape propagation after the executor needs weights; on meta weights the executor's own pass did it.
    shared = SharedConfig(local_rank=rank, world_size=world)
    cfg = {"sharding_transform_executor": {"run_shape_prop": False}}
    return InferenceOptimizer(None, cfg)(mod=gm, shared_config=shared)


def params_to_meta(gm: GraphModule) -> GraphModule:
    """Parameters onto the meta device (buffers such as rotary tables stay: they are not checkpoint weights)."""
    for name, p in list(gm.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner), attr, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
    return gm


def _rank_run(ctx: RankContext, gm: GraphModule, inputs: dict, detect: dict | None, factory: Any, on_meta: bool) -> dict:
    full = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    if on_meta:
        # The pipeline shards a graph whose weights are still on the meta device, then loads them.
        gm = params_to_meta(detect_only(gm, ctx.rank, ctx.world_size, detect, factory))
        gm = execute_only(gm, ctx.rank, ctx.world_size)
    else:
        gm = shard_graph(gm, ctx.rank, ctx.world_size, detect, factory)
    gm.load_state_dict(full, assign=on_meta)
    specs = shard_specs(gm)
    local = {t: gm.get_parameter(t).numel() if t in dict(gm.named_parameters()) else 0 for t in specs}
    with torch.no_grad():
        logits = gm(**inputs)
    plan = gm.meta[PLAN_META_KEY]
    return {
        "logits": logits,
        "plan": str(plan),
        "kinds": {e.module or n: e.kind.value for n, e in plan.entries.items()},
        "bytes": {t: (local[t] * full[t].element_size(), full[t].numel() * full[t].element_size()) for t in specs},
        "state_keys": sorted(gm.state_dict()),
    }


def run_ranks(
    gm: GraphModule,
    inputs: dict[str, torch.Tensor],
    world: int,
    detect: dict | None = None,
    factory: Any = None,
    on_meta: bool = False,
    backend: str = "gloo",
) -> list[dict]:
    """Shard and run `gm` on `world` forked ranks; each returns its logits, plan and shard sizes."""
    return launch(_rank_run, world, (gm, inputs, detect, factory, on_meta), backend=backend, start_method="fork",
                  timeout_s=240)


def assert_shards_are_one_nth(result: dict, world: int) -> None:
    assert result["bytes"], "no tensor was sharded"
    for target, (local, full) in result["bytes"].items():
        assert local * world == full, f"{target}: {local} bytes local vs {full} full"

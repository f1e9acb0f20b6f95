"""detect_sharding: a plan in gm.meta, one entry per node, graph untouched; skipped at world size 1."""

import torch
import torch.nn as nn
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.sharding.plan import PLAN_META_KEY, ShardKind
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, run_shape_prop


class Block(nn.Module):
    """embedding -> residual MLP (up, relu, down) -> head: one tp region."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def _export() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return run_shape_prop(torch_export_to_gm(Block().eval(), (torch.randint(0, 32, (2, 5)),)))


def test_plan_recorded_graph_unchanged() -> None:
    gm = _export()
    before = str(gm.graph)
    opt = InferenceOptimizer(None, {"detect_sharding": {}})
    gm = opt(mod=gm, shared_config=SharedConfig(local_rank=1, world_size=2))
    plan = gm.meta[PLAN_META_KEY]
    assert {e.module: e.kind for e in plan.entries.values()} == {"up": ShardKind.COLUMN, "down": ShardKind.ROW}
    assert opt.history["detect_sharding"].num_matches == 2 and str(gm.graph) == before
    assert count_op(gm, torch.ops.aten.linear) == 3


def test_world_size_one_skips() -> None:
    opt = InferenceOptimizer(None, {"detect_sharding": {}})
    gm = opt(mod=_export(), shared_config=SharedConfig())
    assert opt.history["detect_sharding"].skipped and len(gm.meta[PLAN_META_KEY]) == 0

"""sharding_transform_executor on one rank of two: local shards, collectives inserted, load hook slices."""

import torch
import torch.nn as nn
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.sharding.load_hooks import shard_specs
from ad_compiler.transform.interface import SharedConfig
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_compiler.utils.graph_utils import count_op, run_shape_prop

import ad_compiler.custom_ops  # noqa: F401

ad = torch.ops.auto_deploy


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        return self.head(h + self.down(torch.relu(self.up(h))))


def _shard(rank: int, **detect) -> tuple[torch.fx.GraphModule, dict]:
    torch.manual_seed(0)
    gm = run_shape_prop(torch_export_to_gm(Block().eval(), (torch.randint(0, 32, (2, 5)),)))
    full = {k: v.clone() for k, v in gm.state_dict().items()}
    opt = InferenceOptimizer(None, {"detect_sharding": detect, "sharding_transform_executor": {}})
    return opt(mod=gm, shared_config=SharedConfig(local_rank=rank, world_size=2)), full


def test_column_row_shards_and_all_reduce() -> None:
    gm, full = _shard(rank=1)
    assert gm.up.weight.shape == (12, 16) and gm.up.bias.shape == (12,)
    assert torch.equal(gm.up.weight, full["up.weight"][12:]) and torch.equal(gm.down.weight, full["down.weight"][:, 12:])
    assert gm.down.bias.shape == (16,)  # added once, after the all-reduce
    assert count_op(gm, ad.torch_dist_all_reduce) == 1 and count_op(gm, ad.torch_dist_all_gather) == 0


def test_load_hook_slices_full_and_keeps_sharded() -> None:
    gm, full = _shard(rank=1)
    assert set(shard_specs(gm)) == {"up.weight", "up.bias", "down.weight"}
    zeros = {k: torch.zeros_like(v) for k, v in full.items()}
    gm.load_state_dict(zeros)
    gm.load_state_dict(full)  # full checkpoint: sliced by the pre-hook
    assert torch.equal(gm.down.weight, full["down.weight"][:, 12:])
    local = {k: v.clone() for k, v in gm.state_dict().items()}
    gm.load_state_dict(zeros)
    gm.load_state_dict(local)  # an already-sharded state dict loads as is
    assert torch.equal(gm.up.weight, full["up.weight"][12:])


"""sharding_transform_executor: apply gm.meta's sharding plan (local shards, collectives, load hooks)."""

from typing import Any

from torch.fx import GraphModule

from ...errors import CompileError
from ...models.factory import ModelFactory
from ...sharding.apply import apply_plan
from ...sharding.plan import PLAN_META_KEY, ShardingPlan
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("sharding_transform_executor")
class ShardingTransformExecutor(BaseTransform):
    """Per plan entry, e.g. a row entry on o_proj (rank r of N):

    linear(x, Wo[H, I])  ->  torch_dist_all_reduce(linear(x, Wo[:, r*I/N:(r+1)*I/N]))
    """

    def _apply(
        self, mod: Any, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[Any, TransformInfo]:
        if not isinstance(mod, GraphModule):
            return mod, TransformInfo(skipped=True, reason="not a GraphModule")
        plan: ShardingPlan | None = mod.meta.get(PLAN_META_KEY)
        if plan is None or shared_config.world_size == 1:
            return mod, TransformInfo(skipped=True, reason="no sharding plan" if plan is None else "world_size 1")
        if plan.world_size != shared_config.world_size:
            raise CompileError(
                f"sharding plan is for world_size {plan.world_size}, running with {shared_config.world_size}: "
                "run detect_sharding again"
            )
        applied = apply_plan(mod, plan, shared_config.local_rank)
        return mod, TransformInfo(num_matches=applied)

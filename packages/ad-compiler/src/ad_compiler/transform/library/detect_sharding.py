"""detect_sharding: record the sharding plan (one entry per node) in gm.meta for the executor."""

import logging
from typing import Any

from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...sharding.detect import detect_plan
from ...sharding.plan import PLAN_META_KEY
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

logger = logging.getLogger(__name__)


@TransformRegistry.register("detect_sharding")
class DetectSharding(BaseTransform):
    """Plan only; the graph is unchanged.

    linear(x, Wq)  ->  gm.meta["sharding_plan"].entries["linear"] = column (source heuristic)
    """

    def _apply(
        self, mod: Any, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[Any, TransformInfo]:
        if not isinstance(mod, GraphModule):
            return mod, TransformInfo(skipped=True, reason="not a GraphModule")
        world, rank = shared_config.world_size, shared_config.local_rank
        plan = detect_plan(mod, self.config, factory, world, rank)
        mod.meta[PLAN_META_KEY] = plan
        if world > 1:
            logger.info("%s", plan)
        return mod, TransformInfo(skipped=world == 1, num_matches=len(plan), reason="world_size 1" if world == 1 else None)

"""Build the sharding plan from the configured sources, in `sharding_source` order (first claim wins)."""

import logging

from ad_config.transform_config import DetectShardingConfig
from torch.fx import GraphModule

from ..models.factory import ModelFactory
from .heuristic_ep_bmm import detect_bmm, detect_ep
from .heuristic_ssm import detect_ssm
from .heuristic_tp import detect_simple, detect_tp
from .plan import ShardingPlan
from .sources import detect_from_tp_plan, split_factory_config

logger = logging.getLogger(__name__)

# ssm, ep and bmm claim their special nodes before tp looks at whole regions.
_HEURISTIC_ORDER = ("ssm", "ep", "bmm", "tp")


def factory_plan(cfg: DetectShardingConfig, factory: ModelFactory | None) -> tuple[dict[str, str], int | None]:
    """The factory source: an explicit `factory_config` wins, else the model config's own plan."""
    if cfg.factory_config.tp_plan:
        return dict(cfg.factory_config.tp_plan), cfg.factory_config.head_dim
    getter = getattr(factory, "get_sharding_config", None)
    raw = getter() if callable(getter) else {}
    return split_factory_config(raw or {})


def run_heuristics(gm: GraphModule, plan: ShardingPlan, dims: list[str]) -> int:
    detectors = {"ssm": detect_ssm, "ep": detect_ep, "bmm": detect_bmm, "tp": detect_tp}
    return sum(detectors[d](gm, plan) for d in _HEURISTIC_ORDER if d in dims)


def detect_plan(
    gm: GraphModule, cfg: DetectShardingConfig, factory: ModelFactory | None, world_size: int, rank: int
) -> ShardingPlan:
    plan = ShardingPlan(world_size=world_size, rank=rank)
    if world_size == 1:
        return plan
    if cfg.simple_shard_only:
        detect_simple(gm, plan)
        run_heuristics(gm, plan, [d for d in cfg.sharding_dims if d in ("ep", "bmm")])
        return plan
    for source in cfg.sharding_source:
        if source == "manual":
            mc = cfg.manual_config
            n = detect_from_tp_plan(gm, plan, dict(mc.tp_plan), mc.head_dim, "manual", cfg.support_partial_config)
        elif source == "factory":
            tp_plan, head_dim = factory_plan(cfg, factory)
            n = detect_from_tp_plan(gm, plan, tp_plan, head_dim, "factory", cfg.support_partial_config)
        else:
            n = run_heuristics(gm, plan, list(cfg.sharding_dims))
        logger.info("sharding source %s claimed %d node(s)", source, n)
    return plan

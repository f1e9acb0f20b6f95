"""Plans from tp_plan mappings (manual config, the model factory's own plan): module patterns to entries."""

import logging
import re
from typing import Any

from torch.fx import GraphModule, Node

from ..utils.graph_utils import get_attr_tensor
from .graph import (
    attention_heads,
    attention_nodes,
    in_numbered_layer,
    is_linear,
    linear_weight,
    module_name,
    out_features,
    output_chunks,
    regions,
)
from .heuristic_ssm import mamba_entry
from .plan import ShardEntry, ShardingPlan, ShardKind

logger = logging.getLogger(__name__)

# Our strategies plus the Hugging Face tp_plan names that mean the same for a linear layer.
STRATEGIES: dict[str, ShardKind] = {
    "colwise": ShardKind.COLUMN,
    "local_colwise": ShardKind.COLUMN,
    "rowwise": ShardKind.ROW,
    "local_rowwise": ShardKind.ROW,
    "gather": ShardKind.SIMPLE,
    "mamba": ShardKind.MAMBA,
}


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters; a pattern matches a module path or any dotted suffix of it."""
    body = ".*".join(re.escape(p) for p in pattern.split("*"))
    return re.compile(rf"(?:.*\.)?{body}")


def split_factory_config(cfg: dict[str, Any]) -> tuple[dict[str, str], int | None]:
    """(tp_plan, head_dim) from what a factory returns: a bare plan, or {"tp_plan": ..., "head_dim": ...}."""
    if "tp_plan" in cfg:
        return dict(cfg.get("tp_plan") or {}), cfg.get("head_dim")
    plan = {k: v for k, v in cfg.items() if isinstance(v, str)}
    head_dim = cfg.get("head_dim")
    return plan, head_dim if isinstance(head_dim, int) else None


def _region_of(gm: GraphModule) -> dict[Node, tuple[int, int, int]]:
    """For each linear inside an attention region: (query heads, kv heads, head_dim) of that attention."""
    out = {}
    for region in regions(gm):
        attn = attention_nodes(region.nodes)
        if attn:
            heads = attention_heads(attn[0])
            out.update({n: heads for n in region.linears})
    return out


def detect_from_tp_plan(
    gm: GraphModule,
    plan: ShardingPlan,
    tp_plan: dict[str, str],
    head_dim: int | None,
    source: str,
    support_partial: bool,
) -> int:
    """Claim entries for the linears a tp_plan names; returns how many were claimed."""
    if not tp_plan:
        return 0
    world = plan.world_size
    compiled = [(pattern_regex(p), s) for p, s in tp_plan.items()]
    linears = [n for n in gm.graph.nodes if is_linear(n) and linear_weight(n)]
    chosen: dict[Node, ShardKind] = {}
    for n in linears:
        strategy = next((s for regex, s in compiled if regex.fullmatch(module_name(n))), None)
        if strategy in STRATEGIES:
            chosen[n] = STRATEGIES[strategy]
    uncovered = [module_name(n) for n in linears if in_numbered_layer(module_name(n)) and n not in chosen]
    if uncovered and not support_partial:
        logger.warning(
            "%s sharding config does not cover %d layer(s) (e.g. %s) and support_partial_config is false: ignored",
            source, len(uncovered), uncovered[0],
        )
        return 0
    heads = _region_of(gm)
    entries: list[ShardEntry] = []
    demoted: set[Node] = set()
    for n, kind in chosen.items():
        name = module_name(n)
        if kind == ShardKind.MAMBA:
            entry = mamba_entry(gm, n, world, source)
            if entry is None:
                logger.warning("%s: mamba strategy does not apply to %s; left unsharded", source, name)
            else:
                entries.append(entry)
            continue
        if kind == ShardKind.COLUMN:
            # head_dim only constrains projections that feed attention; MLP splits need no unit.
            n_q, n_kv, hd = heads.get(n, (world, world, 1))
            unit = (head_dim or hd) if n in heads else 1
            chunks = output_chunks(n, out_features(gm, n))
            if n_q % world or n_kv % world or any(c % (world * unit) for c in chunks):
                demoted.add(n)
            entries.append(ShardEntry(n.name, kind, source, name, chunks, unit))
            continue
        if kind == ShardKind.ROW and get_attr_tensor(gm, linear_weight(n)).shape[1] % world:
            demoted.add(n)
        entries.append(ShardEntry(n.name, kind, source, name))
    entries = _demote(gm, entries, demoted, world, source)
    return sum(plan.claim(e) for e in entries)


def _demote(
    gm: GraphModule, entries: list[ShardEntry], demoted: set[Node], world: int, source: str
) -> list[ShardEntry]:
    """Heads that don't divide: the whole region's column/row entries become simple, so they stay consistent."""
    if not demoted:
        return entries
    names: set[str] = {n.name for n in demoted}
    for region in regions(gm):
        if demoted & set(region.linears):
            names |= {n.name for n in region.linears}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for e in entries:
        if e.node in names and e.kind in (ShardKind.COLUMN, ShardKind.ROW):
            logger.info("%s: %s falls back to simple sharding (heads or features do not divide %d)", source, e.module, world)
            if out_features(gm, nodes[e.node]) % world:
                continue
            e = ShardEntry(e.node, ShardKind.SIMPLE, source, e.module, note="fallback")
        out.append(e)
    return out

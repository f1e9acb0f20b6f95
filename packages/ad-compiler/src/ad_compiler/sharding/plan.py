"""The sharding plan as data: one entry per graph node, with the source that claimed it."""

from dataclasses import dataclass, field
from enum import Enum

import torch


class ShardKind(str, Enum):
    COLUMN = "column"  # output features split; the consumer works on local heads/features
    ROW = "row"  # input features split; partial sums all-reduced
    SIMPLE = "simple"  # output features split, then all-gathered (manual strategy "gather")
    EXPERT = "expert"  # contiguous expert slice per rank; routing masked; all-reduce
    BMM = "bmm"  # batch of stacked weights split; all-gathered
    MAMBA = "mamba"  # Mamba mixer: in_proj per chunk, conv and per-head parameters


@dataclass(frozen=True)
class ShardSpec:
    """How one full tensor maps to a rank's local piece: along `dim`, each chunk split into `world_size`."""

    dim: int
    chunks: tuple[int, ...]  # sizes along `dim` that are split independently (fused weights)
    rank: int
    world_size: int

    def slice(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of `full` (a copy, so the full tensor can be freed)."""
        assert full.shape[self.dim] == sum(self.chunks), (full.shape, self.chunks)
        pieces, start = [], 0
        for c in self.chunks:
            n = c // self.world_size
            pieces.append(full.narrow(self.dim, start + self.rank * n, n))
            start += c
        return torch.cat(pieces, dim=self.dim).contiguous() if len(pieces) > 1 else pieces[0].clone()

    def divides(self) -> bool:
        return all(c % self.world_size == 0 for c in self.chunks)


@dataclass
class ShardEntry:
    """One node's sharding decision.

    `node` is the FX node claimed (a linear, torch_moe, bmm, or a Mamba in_proj linear). `chunks` are
    the fused-weight chunk sizes along the split dim, `granularity` the unit a split must respect in
    every chunk (head_dim for attention projections), `params` extra parameter targets sharded with
    the entry (Mamba conv/per-head params) with their specs' chunk sizes along dim 0.
    """

    node: str
    kind: ShardKind
    source: str
    module: str = ""
    chunks: tuple[int, ...] = ()
    granularity: int = 1
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    note: str = ""

    def row(self) -> str:
        extra = []
        if len(self.chunks) > 1:
            extra.append(f"chunks={list(self.chunks)}")
        if self.granularity > 1:
            extra.append(f"unit={self.granularity}")
        if self.params:
            extra.append(f"+{len(self.params)} params")
        if self.note:
            extra.append(self.note)
        return f"{self.node:<28} {self.kind.value:<7} {self.source:<9} {self.module} {' '.join(extra)}".rstrip()


@dataclass
class ShardingPlan:
    """Entries by node name; the first source to claim a node keeps it."""

    world_size: int
    rank: int = 0
    entries: dict[str, ShardEntry] = field(default_factory=dict)

    def claim(self, entry: ShardEntry) -> bool:
        if entry.node in self.entries:
            return False
        self.entries[entry.node] = entry
        return True

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        head = f"ShardingPlan(world_size={self.world_size}, rank={self.rank}, {len(self.entries)} entries)"
        return "\n".join([head, *(e.row() for e in self.entries.values())])


PLAN_META_KEY = "sharding_plan"

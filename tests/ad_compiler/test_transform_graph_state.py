"""Transforms canonicalise and shape-propagate the graph only when it changed since it was last done."""

from typing import Any

import pytest
import torch
import torch.fx as fx
from ad_compiler.transform import interface
from ad_compiler.transform.interface import BaseTransform, TransformInfo
from ad_config.transform_config import Stage, TransformConfig


class _Config(TransformConfig):
    """A test transform's config."""

    stage: Stage = Stage.PATTERN_MATCHER


class _Counted(BaseTransform):
    """Reports `matches` matches (0: the graph is left as it was)."""

    config_class = _Config
    registry_key = "counted"

    def __init__(self, matches: int, **config: Any):
        super().__init__(config)
        self.matches = matches

    def _apply(self, gm: Any, cm: Any, factory: Any, shared_config: Any) -> tuple[Any, TransformInfo]:
        return gm, TransformInfo(num_matches=self.matches)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"clean": 0, "shapes": 0}

    def clean(gm: fx.GraphModule) -> fx.GraphModule:
        counts["clean"] += 1
        return gm

    def shapes(gm: fx.GraphModule) -> fx.GraphModule:
        counts["shapes"] += 1
        return gm

    monkeypatch.setattr(interface, "canonicalize_graph", clean)
    monkeypatch.setattr(interface, "run_shape_prop", shapes)
    return counts


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Linear(2, 2))


def test_an_unchanged_graph_is_not_cleaned_again(calls: dict[str, int]) -> None:
    gm = _graph()
    for _ in range(3):
        _Counted(0, requires_shape_prop=True)(gm)
    assert calls == {"clean": 1, "shapes": 1}  # the first time only: a graph seen first is treated as stale


def test_a_changed_graph_is_cleaned_before_the_next_transform(calls: dict[str, int]) -> None:
    gm = _graph()
    _Counted(0)(gm)  # cleans the new graph
    _Counted(2, run_graph_cleanup=False)(gm)  # changes it and leaves it unclean
    assert calls["clean"] == 1
    _Counted(0, requires_shape_prop=True)(gm)  # must clean and propagate first
    assert calls == {"clean": 2, "shapes": 1}
    _Counted(3)(gm)  # changes it and cleans up after itself
    _Counted(0)(gm)
    assert calls["clean"] == 3

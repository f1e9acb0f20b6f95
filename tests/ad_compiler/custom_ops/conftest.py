"""Shared helpers for the canonical-op tests: export a callable and count the op's nodes."""

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import ad_compiler.custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*


class _Wrap(nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def export_fn(fn: Callable, args: tuple, dynamic_shapes: tuple) -> torch.export.ExportedProgram:
    # forward(*args) takes one varargs parameter, so its shapes are nested once more.
    return torch.export.export(_Wrap(fn), args, dynamic_shapes=(dynamic_shapes,))


def count_calls(ep: torch.export.ExportedProgram, op: torch._ops.OpOverloadPacket) -> int:
    targets = {getattr(op, o) for o in op.overloads()}
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in targets)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
